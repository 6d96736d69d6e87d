"""Datasets for the application: readers of the raw files, with a TFDS fallback (`datasets`),
and the input pipelines of a run (`pipelines`)."""
