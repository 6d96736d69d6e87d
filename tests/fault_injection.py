"""Runs a trainer with a fault injected, for the crash tests. Test-only: the shipped code has no
fault hooks; this wraps the functions the trainer calls before it starts the trainer.

    python tests/fault_injection.py POINT -m keras_wt.app.cli FLAGS...
    python tests/fault_injection.py POINT tpu/train_imagenet.py FLAGS...

The process kills itself (SIGKILL) at POINT:

    weights:E    halfway through writing the backup of epoch E (1-based): the file cut in half,
                 never renamed
    renamed:E    after writing that file completely, before its rename
    manifest:E   halfway through writing the manifest that names it: cut in half, never renamed
    written:E    after that manifest is in place, before the older backups are deleted
    batch:E:B    after training batch B of epoch E (after the host call that ran it, with
                 several steps per call)

Every file a backup writes goes through `keras_wt.app.runs.replace_file` (the rename) and every
batch through the callbacks, which is where the faults are put.
"""

import json
import os
import runpy
import signal
import sys

POINTS = ("weights", "renamed", "manifest", "written", "batch")


def _kill():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _manifest_epochs(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)["epochs"]


def install(point):
    """Wraps the trainer's functions so that the process dies at `point`."""
    from keras_wt.app import backup
    from keras_wt.app import runs

    kind, *numbers = point.split(":")
    if kind not in POINTS:
        raise ValueError(f"point={point!r}: the kind is not one of {POINTS}")
    numbers = [int(n) for n in numbers]
    if kind == "batch":
        epoch, batch = numbers

        def on_epoch_begin(self, e, logs=None):
            self._fault_epoch, self._fault_done = e + 1, 0

        def on_train_batch_end(self, b, logs=None):
            # With several steps per call Keras reports a call's last batch only.
            if self._fault_epoch == epoch and self._fault_done < batch <= b + 1:
                _kill()
            self._fault_done = b + 1

        backup.AtomicBackup.on_epoch_begin = on_epoch_begin
        backup.AtomicBackup.on_train_batch_end = on_train_batch_end
        return
    (epoch,) = numbers
    replace_file = runs.replace_file

    def faulty_replace_file(tmp, path):
        name = os.path.basename(path)
        weights = name == f"epoch-{epoch:04d}.weights.h5"
        manifest = name == backup.MANIFEST and _manifest_epochs(tmp) == epoch
        if (kind in ("weights", "renamed") and weights) or (kind == "manifest" and manifest):
            if kind != "renamed":
                with open(tmp, "rb+") as f:
                    f.truncate(os.path.getsize(tmp) // 2)
            _kill()
        replace_file(tmp, path)
        if kind == "written" and manifest:
            _kill()

    runs.replace_file = faulty_replace_file


def main(argv):
    point, *command = argv
    if point:
        install(point)
    if command[0] == "-m":
        sys.argv = [command[1]] + command[2:]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
