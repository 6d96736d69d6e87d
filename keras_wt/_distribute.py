"""Assigning variables identically on every replica: `keras_wt.backend.assign_on_every_replica`,
importable from here by `keras_wt.mirror` and `keras_wt.optimizers` until they import the backend
module themselves (the second pass of issue #19's item 3)."""

from keras_wt.backend import assign_on_every_replica

__all__ = ("assign_on_every_replica",)
