"""What a resumed run does with its run folder before it trains on, so that every epoch is
recorded exactly once however often the run was killed.

A run writes an epoch's records (`results.json`, `history.csv`, the TensorBoard events) before
that epoch's backup (`keras_wt.app.backup.AtomicBackup`, the last callback); a kill between the two
leaves records of an epoch that the resumed run trains again. `prepare` first cuts the records
back to the `epochs` the backup holds:

* `history.csv` keeps its header and the rows of those epochs (byte for byte); a row cut short by
  a kill goes too;
* the TensorBoard event files keep the summaries of those epochs: Keras's epoch summaries
  (`epoch_*`) at the epoch's 0-based index, so the steps below `epochs`, and its evaluation
  summaries (`evaluation_*_vs_iterations`) at the optimizer's step count, so the steps up to
  `epochs × steps_per_epoch`; a record cut short by a kill goes too;
* `results.json` keeps the entries of those epochs. An entry it lacks (the file deleted or
  damaged) is rebuilt from `history.csv`, which holds every number of every epoch (not the
  epoch's `seconds`); when `history.csv` cannot either, the resume is refused (`RunError`).

A folder whose records show two or more epochs but that holds no backup at all (deleted) is
refused as well, instead of being started over silently.
"""

import csv
import logging
import os

import tensorflow as tf

from keras_wt.app import runs

logger = logging.getLogger("keras_wt")

_EVENTS = "events.out.tfevents."


def read_history(path):
    """`(header lines, {epoch (1-based): (raw line, row dict)})` of a `history.csv`: a row whose
    fields do not match the header (cut short by a kill) is left out. Missing file: `(None, {})`."""
    if not runs.exists(path):
        return None, {}
    try:
        lines = runs.read_text(path).splitlines(keepends=True)
    except UnicodeDecodeError as e:
        logger.warning("%s is damaged (%s): its rows are lost", path, e)
        return None, {}
    if not lines or not lines[0].endswith("\n"):
        return None, {}
    header = next(csv.reader([lines[0]]))
    rows = {}
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        if not line.endswith("\n") or len(fields) != len(header):
            continue
        try:
            epoch = int(fields[0]) + 1  # CSVLogger's epochs are 0-based
        except ValueError:
            continue
        rows[epoch] = (line, dict(zip(header, fields)))
    return lines[0], rows


def trim_history(path, epochs):
    """Cuts `history.csv` back to the rows of epochs `1..epochs`; returns those rows
    `{epoch: row dict}`."""
    header, rows = read_history(path)
    if header is None:
        if runs.exists(path) and tf.io.gfile.stat(path).length:
            runs.write_text(path, "")  # a header cut short, or damage: CSVLogger starts again
        return {}
    kept = {e: rows[e] for e in sorted(rows) if e <= epochs}
    text = header + "".join(line for line, _ in kept.values())
    if text != runs.read_text(path):
        runs.write_text(path, text)
    return {e: row for e, (_, row) in kept.items()}


def _event_files(directory):
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(
        os.path.join(root, name)
        for root, _, names in tf.io.gfile.walk(directory) for name in names
        if name.startswith(_EVENTS)
    )


def _later(event, epochs, steps_per_epoch):
    """Whether a summary `event` of Keras's TensorBoard callback is of an epoch after `epochs`."""
    for value in event.summary.value:
        if value.tag.startswith("epoch_") and event.step >= epochs:
            return True
        if value.tag.endswith("_vs_iterations") and event.step > epochs * steps_per_epoch:
            return True
    return False


def trim_tensorboard(directory, epochs, steps_per_epoch):
    """Drops from every event file under `directory` the summaries of the epochs after `epochs`
    (module docstring; `steps_per_epoch`: the optimizer steps of an epoch) and any record cut
    short by a kill."""
    for path in _event_files(directory):
        kept, changed = [], False
        try:
            for record in tf.data.TFRecordDataset(path):
                record = record.numpy()
                event = tf.compat.v1.Event.FromString(record)
                if _later(event, epochs, steps_per_epoch):
                    changed = True
                else:
                    kept.append(record)
        except tf.errors.DataLossError:  # the last record cut short by a kill
            changed = True
        if not changed:
            continue
        tmp = f"{path}.tmp" if runs.is_local(path) else path
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in kept:
                writer.write(record)
        if tmp != path:
            runs.replace_file(tmp, path)


def _read_results(path):
    if not runs.exists(path):
        return {}, None
    try:
        results = runs.read_json(path)
        if not isinstance(results, dict):
            raise ValueError(f"a JSON {type(results).__name__}, not an object")
        return {k: v for k, v in results.items() if runs.key_epoch(k) >= 1}, None
    except (ValueError, UnicodeDecodeError, IndexError) as e:
        return {}, f"{path} is damaged ({type(e).__name__}: {e})"


def _recorded_epochs(results, rows):
    return max([runs.key_epoch(k) for k in results] + list(rows) + [0])


def prepare(run_dir, epochs, evaluated, steps_per_epoch):
    """Cuts the records of `run_dir` back to the `epochs` its backup holds (module docstring) and
    returns the `results.json` entries of those epochs, `{key: entry}` in epoch order.

    Args:
        run_dir: the run folder (written by this process only: hold its `RunLock`).
        epochs: the epochs completed by the backup the run resumes from (0: none).
        evaluated: the evaluated epochs of the run (`keras_wt.app.config.evaluated_epochs`).
        steps_per_epoch: the optimizer steps of an epoch.

    Raises:
        RunError: the records show epochs that no backup holds, or results that nothing can
            rebuild.
    """
    path = lambda name: os.path.join(run_dir, name)  # noqa: E731
    results, damage = _read_results(path(runs.RESULTS_FILE))
    _, all_rows = read_history(path(runs.HISTORY_FILE))
    recorded = _recorded_epochs(results, all_rows)
    if not epochs and recorded >= 2:
        raise runs.RunError(
            f"{run_dir} records {recorded} epochs ({runs.RESULTS_FILE}, {runs.HISTORY_FILE}) but "
            f"its {runs.BACKUP_DIR}/ holds no backup: refusing to start it over. Restore "
            f"{path(runs.BACKUP_DIR)}, or start a new run."
        )
    if recorded > epochs + 1:
        logger.warning("%s records epochs up to %d, its backup only %d: epochs %d-%d are trained "
                       "again.", run_dir, recorded, epochs, epochs + 1, recorded)
    kept = {runs.epoch_key(e): results[runs.epoch_key(e)]
            for e in sorted(runs.key_epoch(k) for k in results) if e <= epochs}
    missing = [e for e in evaluated if e <= epochs and runs.epoch_key(e) not in kept]
    lacking = [e for e in missing if e not in all_rows]
    if lacking:  # refused before anything is changed
        raise runs.RunError(
            f"{path(runs.RESULTS_FILE)} lacks epochs {_span(missing)}"
            + (f" ({damage})" if damage else "")
            + f" and {runs.HISTORY_FILE} cannot rebuild epochs {_span(lacking)}: refusing to "
            "resume a run whose record would miss them. Restore the file, or start a new run."
        )
    if damage:
        logger.warning("%s", damage)
    rows = trim_history(path(runs.HISTORY_FILE), epochs)
    trim_tensorboard(path(runs.TENSORBOARD_DIR), epochs, steps_per_epoch)
    if missing:
        for e in missing:
            kept[runs.epoch_key(e)] = runs.results_entry(rows[e])
        kept = dict(sorted(kept.items(), key=lambda item: runs.key_epoch(item[0])))
        logger.warning("Rebuilt epochs %s of %s from %s (without their seconds).",
                       _span(missing), path(runs.RESULTS_FILE), runs.HISTORY_FILE)
    if missing or len(kept) != len(results):
        runs.write_json(path(runs.RESULTS_FILE), kept)
    return kept


def _span(epochs):
    epochs = sorted(epochs)
    if len(epochs) > 2 and epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"{epochs[0]}-{epochs[-1]}"
    return ", ".join(map(str, epochs))
