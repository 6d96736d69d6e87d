"""The training application around the keras_wt library.

Configs and the run pipeline (`training`, `experiment`), data readers and input pipelines
(`data`), run folders and their crash-safe backups (`runs`, `backup`, `resume`), distribution
strategies (`strategies`), the command lines (`cli`: `keras-wt-train`, `keras-wt-plot`) and the
figures (`plots`). It imports the library (`keras_wt`, `keras_wt.layers`, ...); the library never
imports it. Importing this package imports nothing else, so `keras_wt.app.cli` parses its flags
before TensorFlow is imported.
"""
