"""keras_wt: deep learning without weight transport, as drop-in Keras 3 layers.

Backprop (`bp`), feedback alignment (`fa`), sign symmetry (`ss`), the weight mirror (`wm`) and
the Kolen–Pollack circuit (`kp`) of Akrout et al., "Deep Learning without Weight Transport"
(NeurIPS 2019), and the rest of the field's rules in the same registry: sign-concordant feedback
with fixed or batchwise random magnitudes (`frsf`, `brsf`), direct feedback alignment (`dfa`),
and Kunin et al.'s symmetric and information alignment (`sa`, `ia`). See DESIGN.md for the math
and the README for a tour.

The package has two halves: the library (the modules here and `keras_wt.layers`,
`keras_wt.models`) and the training application `keras_wt.app` (configs, data, the run
pipeline, run folders, the command lines), which imports the library and is never imported by
it.

Importing the library imports Keras and TensorFlow (seconds), which the command lines must not
do before their flags are parsed (`keras-wt-train --help`). So when `keras_wt` is imported
before Keras, the library loads lazily (PEP 562): a module on its first use (`keras_wt.layers`),
all of it on the first use of a function or constant (`keras_wt.convert`). Imported after Keras
(`import keras` then `import keras_wt`, as every example does), `keras_wt` loads at once,
registering its layers, optimizer, schedule, metrics and losses for `keras.saving.load_model`;
import Keras first before loading a file that holds keras_wt objects.
"""

import importlib
import sys

__version__ = "0.1.0"

# The library's public names: module -> names it gives the package (a module listed with no
# names is exported itself).
_EXPORTS = {
    "algorithms": ("ALGORITHMS",),
    "alignment": (),
    "callbacks": (),
    "dfa": (),
    "local": (),
    "layers": ("feedback_pairs",),
    "learners": (),  # who trains each B: a wm layer's mirror, a kp kernel's layer
    "metrics": (),
    "mirror": ("MirrorConfig",),
    "models": (),
    "optimizers": (),
    "schedules": ("OptimizerConfig",),  # registers WarmupSchedule for load_model
    "unused_feedback": ("drop_unused_feedback",),
    "convert": ("convert", "strip"),  # `keras_wt.convert` is the function
}
_MODULES = tuple(m for m in _EXPORTS if m != "convert")
_NAMES = {name: module for module, names in _EXPORTS.items() for name in names}


def _load():
    """Imports the library and binds its public names (idempotent)."""
    from keras_wt.backend import check_backend

    check_backend()  # before anything else imports the backend's framework
    for module in _MODULES:
        globals()[module] = importlib.import_module(f"keras_wt.{module}")
    for name, module in _NAMES.items():
        globals()[name] = getattr(importlib.import_module(f"keras_wt.{module}"), name)


def __getattr__(name):
    if name in _NAMES:  # a function or constant: load everything, so it is all registered
        _load()
        return globals()[name]
    if name in _MODULES:  # a module: import that one (library modules import each other so)
        return importlib.import_module(f"keras_wt.{name}")
    raise AttributeError(f"module 'keras_wt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MODULES) | set(_NAMES))


if "keras" in sys.modules:
    _load()
