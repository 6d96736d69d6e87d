"""keras-wt-sweep: the grid's expansion and names, sharding, skipping finished points, resuming
an interrupted one, leaving a point another process holds, and the summary's statistics against
the run folders' own results."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_flags

from keras_wt.app import cli
from keras_wt.app import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the grid ----------------------------------------------------------------------------------


def test_the_grid_is_the_product_of_every_flags_values_in_the_order_given():
    grid = sweep.parse_grid(["--algo", "bp", "kp", "--seed", "1", "2", "3",
                             "--size_hidden_layers", "500", "250,250", "--no-batch_norm",
                             "--n_epochs=4"])
    assert grid == {"algo": ["bp", "kp"], "seed": ["1", "2", "3"],
                    "size_hidden_layers": ["500", "250,250"], "no-batch_norm": [],
                    "n_epochs": ["4"]}
    points = sweep.expand(grid)
    assert len(points) == 2 * 3 * 2
    assert points[0] == {"algo": "bp", "seed": "1", "size_hidden_layers": "500",
                         "no-batch_norm": None, "n_epochs": "4"}
    assert points[-1]["algo"] == "kp" and points[-1]["seed"] == "3"
    assert len({sweep.point_name(p) for p in points}) == len(points)
    assert sweep.point_argv(points[1]) == [
        "--algo", "bp", "--seed", "1", "--size_hidden_layers", "250", "250", "--no-batch_norm",
        "--n_epochs", "4"]
    # names: sorted by flag, without the flags that do not change the result
    assert sweep.point_name({"seed": "2", "algo": "kp", "data_dir": "/a/b", "verbose": "0",
                             "learning_rate": "0.1"}) == "algo=kp,learning_rate=0.1,seed=2"


@pytest.mark.parametrize("tokens, message", [
    (["bp", "--algo", "fa"], "does not follow a flag"),
    (["--algo", "bp", "--seed", "1", "--algo", "fa"], "given twice"),
    (["--save_dir", "x"], "set by the sweep"),
    (["--resume"], "set by the sweep"),
])
def test_a_malformed_grid_is_refused(tokens, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.parse_grid(tokens)


@pytest.mark.parametrize("text", ["2/2", "-1/3", "1", "a/b", "0/0"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(sweep.SweepError, match="0 <= i < n"):
        sweep.parse_shard(text)


def test_the_shards_partition_the_grid():
    points = sweep.expand({"algo": ["bp", "fa", "kp"], "seed": ["1", "2", "3", "4"]})
    shards = [sweep.shard_points(points, (i, 5)) for i in range(5)]
    names = [sweep.point_name(p) for shard in shards for p in shard]
    assert sorted(names) == sorted(sweep.point_name(p) for p in points)
    assert len(names) == len(set(names))


def test_every_point_is_checked_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.sweep_from_flags(["--save_dir", str(tmp_path), "--algo", "bp", "kpp"])
    assert e.value.code == 2
    assert "algo=kpp" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.sweep_from_flags(["--save_dir", str(tmp_path), "--seed", "1", "-4"])
    assert e.value.code == 2
    assert "seed=-4" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / sweep.RUNS_DIR)


# --- end to end on tiny runs -------------------------------------------------------------------


def _sweep_flags(data_dir, save_dir, *extra):
    flags = tiny_flags(data_dir, save_dir, "bp", "--n_epochs", "2")
    i = flags.index("--save_dir")
    del flags[i:i + 2]
    i = flags.index("--algo")
    del flags[i:i + 2]
    return ["--save_dir", str(save_dir), *flags, *extra]


def _test_accuracies(run_dir):
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    return [results[k]["test_accuracy"] for k in sorted(results, key=lambda k: int(k[6:]))]


def _read_summary(save_dir):
    with open(os.path.join(save_dir, "summary.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_shards_run_their_points_a_rerun_skips_them_and_the_summary_is_the_runs_statistics(
        data_dir, tmp_path):
    save_dir = tmp_path / "sweep"
    grid = ["--algo", "bp", "fa", "--seed", "1", "2", "--learning_rate", "0.1", "0.4"]
    flags = _sweep_flags(data_dir, save_dir, *grid)
    points = sweep.expand(sweep.parse_grid(flags[2:]))
    assert len(points) == 8

    first = cli.sweep_from_flags(flags + ["--shard", "0/2"])
    assert sorted(first) == sorted(sweep.point_name(p) for p in points[0::2])
    assert set(first.values()) == {"finished"}
    assert sorted(os.listdir(save_dir / "runs")) == sorted(first)
    rows = _read_summary(save_dir)
    assert sum(int(r["pending"]) for r in rows) == 4

    second = cli.sweep_from_flags(flags + ["--shard", "1/2"])
    assert sorted(second) == sorted(sweep.point_name(p) for p in points[1::2])
    run_dirs = {name: sweep.run_folder(save_dir / "runs" / name) for name in {**first, **second}}
    mtimes = {n: os.path.getmtime(os.path.join(d, "results.json")) for n, d in run_dirs.items()}

    again = cli.sweep_from_flags(flags)
    assert set(again.values()) == {"finished"} and len(again) == 8
    assert mtimes == {n: os.path.getmtime(os.path.join(d, "results.json"))
                      for n, d in run_dirs.items()}  # nothing ran again

    rows = _read_summary(save_dir)
    assert len(rows) == 4  # algo x learning rate; the seeds are the samples
    cells = {}
    for p in points:
        cells.setdefault((p["algo"], p["learning_rate"]), []).append(
            _test_accuracies(run_dirs[sweep.point_name(p)]))
    for row in rows:
        assert {k: row[k] for k in ("n", "diverged", "pending")} == {
            "n": "2", "diverged": "0", "pending": "0"}
        accuracies = cells.pop((row["algo"], row["learning_rate"]))
        finals = [a[-1] for a in accuracies]
        bests = [max(a) for a in accuracies]
        mean = sum(finals) / 2
        assert float(row["final_mean"]) == pytest.approx(mean)
        assert float(row["final_std"] or 0) == pytest.approx(
            math.sqrt(sum((f - mean) ** 2 for f in finals)))
        assert float(row["best_mean"]) == pytest.approx(sum(bests) / 2)
    assert not cells
    assert os.path.isfile(save_dir / "figures" / "learning_rate.png")
    with open(save_dir / "sweep.json", encoding="utf-8") as f:
        assert json.load(f)["grid"]["learning_rate"] == ["0.1", "0.4"]

    # the summary alone, from the grid the folder holds
    os.remove(save_dir / "summary.csv")
    assert cli.sweep_from_flags(["--save_dir", str(save_dir), "--summary_only"]) == {}
    assert _read_summary(save_dir) == rows


def test_a_point_runs_as_keras_wt_train_alone_resumes_exactly_and_is_left_to_its_holder(
        data_dir, tmp_path):
    save_dir = tmp_path / "sweep"
    flags = _sweep_flags(data_dir, save_dir, "--algo", "kp", "--seed", "3", "4")
    killed, held = (sweep.point_name(p) for p in sweep.expand(sweep.parse_grid(flags[2:])))
    killed_dir, held_dir = save_dir / "runs" / killed, save_dir / "runs" / held

    # the first point: killed inside its second epoch, as a sweep's process may be
    argv = sweep.point_argv(sweep.expand(sweep.parse_grid(flags[2:]))[0])
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "fault_injection.py"), "batch:2:1", "-m",
         "keras_wt.app.cli", *argv, "--save_dir", str(killed_dir), "--resume"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sweep.state(killed_dir) == "started"
    # the second point: held by another process
    os.makedirs(held_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from keras_wt.app.runs import RunLock; "
         f"lock = RunLock({str(held_dir)!r}); lock.__enter__(); print('held', flush=True); "
         "sys.stdin.read()"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        outcomes = cli.sweep_from_flags(flags)
    finally:
        holder.communicate("", timeout=60)
    assert outcomes == {killed: "finished", held: "taken"}
    assert sorted(os.listdir(held_dir)) == ["run.lock"]  # nothing ran there
    row, = _read_summary(save_dir)
    assert (row["n"], row["pending"]) == ("1", "1")

    # the resumed point equals keras-wt-train run alone with its flags, bit for bit
    alone = cli.train_from_flags(argv + ["--save_dir", str(tmp_path / "alone")])
    assert _test_accuracies(sweep.run_folder(killed_dir)) == _test_accuracies(alone)
    with open(os.path.join(sweep.run_folder(killed_dir), "log.txt"), encoding="utf-8") as f:
        assert "Resuming" in f.read()


def test_a_sweep_of_rules_alone_draws_each_rules_mean_and_spread():
    from keras_wt.app import sweep_plots

    rows = [{"algo": a, "n_epochs": "20", "n": "3", "final_mean": m, "final_std": s}
            for a, m, s in (("bp", "86.0", "0.5"), ("kp", "86.7", "0.6"), ("fa", "", ""))]
    figures = sweep_plots.sweep_figures(rows, ["algo", "n_epochs"])
    assert list(figures) == ["algo"]
    ax = figures["algo"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bp", "kp"]  # fa has no finished run
    bars = [(float(c.lines[0].get_ydata()[0]), sorted(cap.get_ydata()[0] for cap in c.lines[1]))
            for c in ax.containers]  # (mean, [mean - std, mean + std]) of each rule
    assert bars[0][0] == 86.0 and bars[1][0] == 86.7
    np.testing.assert_allclose(bars[0][1], [85.5, 86.5])
    np.testing.assert_allclose(bars[1][1], [86.1, 87.3])


def test_a_swept_setting_draws_each_rules_curve_and_marks_the_points_that_diverged():
    from keras_wt.app import sweep_plots

    rows = [{"algo": a, "learning_rate": lr, "n": n, "final_mean": m, "final_std": s,
             "diverged": d}
            for a, lr, n, m, s, d in (
                ("bp", "0.1", "2", "83.0", "0.2", "0"), ("bp", "0.4", "2", "85.5", "1.5", "0"),
                ("bp", "0.9", "0", "", "", "2"),
                ("fa", "0.1", "2", "81.4", "0.1", "0"), ("fa", "0.4", "0", "", "", "2"),
                ("fa", "0.9", "0", "", "", "2"))]
    figures = sweep_plots.sweep_figures(rows, ["algo", "learning_rate"])
    ax = figures["learning_rate"].axes[0]
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
              for line in ax.lines if line.get_marker() == "o"}
    assert curves == {"backprop": ([0.1, 0.4], [83.0, 85.5]),
                      "feedback alignment": ([0.1], [81.4])}
    crosses = sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0]))
                     for line in ax.lines if line.get_marker() == "x" and len(line.get_xdata()))
    assert crosses == [(0.4, 0.03), (0.9, 0.03), (0.9, 0.03)]  # bp at 0.9; fa at 0.4 and 0.9
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "0.4", "0.9"]
    assert "over 2 seeds" in ax.get_title()  # the diverged points' n = 0 is not a seed count
