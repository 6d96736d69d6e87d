"""Assigning variables identically on every replica, from any `tf.distribute` context."""

import tensorflow as tf

from keras_wt._compat import merge_call


def assign_on_every_replica(strategy, variables, values):
    """Assigns `values` to `variables` on every replica (each replica's own value, which the
    callers compute identically: the KP update and the all-reduced mirror step)."""

    def update(distribution, variables, values):
        for variable, value in zip(variables, values):
            distribution.extended.update(
                variable.value,
                lambda var, val: var.assign(tf.cast(val, var.dtype)),
                args=(value,),
                group=False,
            )

    merge_call(update, strategy, variables, values)
