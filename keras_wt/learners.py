"""Who trains each feedback kernel: the one registry both ends of that wiring read and write.

A feedback kernel `B` that does not learn from the model's loss is trained by an object outside
the layer: a `keras_wt.mirror.WeightMirror` (`feedback="wm"`), or the Kolen–Pollack optimizer
(`feedback="kp"`), which is given variables, not a model. Rather than attributes written onto
layers or variables (channels no import shows), both ends meet here:

* `attach(layer, learner)` / `learner_of(layer)`: the object that trains `layer`'s `B`.
  `WeightMirror` attaches itself to each layer it mirrors; a `wm` layer whose backward pass is
  built with no learner attached warns that its `B` would stay at its random start
  (`FeedbackLayer._check_feedback_learner`).
* `register_kernel(layer)` / `layer_of_kernel(variable)`: the layer whose forward kernel
  `variable` is. A `kp` layer registers its kernel when it creates its feedback
  (`FeedbackLayer.build_feedback`); `keras_wt.optimizers.KolenPollack.build` finds its `(W, B)`
  pairs among the variables it is given through `layer_of_kernel`.

Both maps hold layers and learners weakly: nothing here keeps a model or a mirror alive (a
mirror holds its layers, so a strong reference from a layer's entry to its mirror would keep
both for the life of the process). A learner is found while something else holds it, as
`MirrorCallback` holds its mirror; a mirror dropped no longer trains its layers, and they say
so again.
"""

import weakref

# layer -> a weak reference to the object that trains its `B`.
_LEARNERS = weakref.WeakKeyDictionary()
# id(kernel) -> the layer owning it. A layer holds its kernel, so while the layer lives the id is
# its kernel's alone; `layer_of_kernel` also checks that the layer's kernel is still `variable`.
_KERNELS = weakref.WeakValueDictionary()


def attach(layer, learner):
    """Records `learner` as what trains `layer`'s feedback kernel (replacing any before)."""
    _LEARNERS[layer] = weakref.ref(learner)


def learner_of(layer):
    """The learner last `attach`ed to `layer` if it still exists, else `None`."""
    learner = _LEARNERS.get(layer)
    return None if learner is None else learner()


def register_kernel(layer):
    """Records `layer` as the owner of its forward kernel `layer.kernel`, for
    `layer_of_kernel`."""
    _KERNELS[id(layer.kernel)] = layer


def layer_of_kernel(variable):
    """The layer `register_kernel` recorded for `variable` if it is still that layer's kernel,
    else `None`."""
    layer = _KERNELS.get(id(variable))
    if layer is None or getattr(layer, "kernel", None) is not variable:
        return None
    return layer
