"""`keras_wt.learners`: who trains each feedback kernel is recorded in one registry, read by
both ends (the layer's check, the Kolen–Pollack optimizer), with nothing written onto layers or
variables and no layer kept alive by it."""

import gc
import weakref

import keras

from keras_wt import learners
from keras_wt import layers as wt
from keras_wt.mirror import WeightMirror


def _model(feedback):
    return keras.Sequential([keras.Input((6,)), wt.Dense(5, feedback=feedback),
                             wt.Dense(3, feedback=feedback)])


def test_a_weight_mirror_is_attached_to_its_layers_without_attributes_on_them():
    model = _model("wm")
    attributes = [set(vars(layer)) for layer in model.layers]
    assert [learners.learner_of(layer) for layer in model.layers] == [None, None]
    mirror = WeightMirror(model, learning_rate=0.1, noise_std=1.0)
    assert all(learners.learner_of(layer) is mirror for layer in model.layers)
    assert [set(vars(layer)) for layer in model.layers] == attributes
    assert not any(hasattr(layer, "feedback_learner") for layer in model.layers)


def test_kp_kernels_are_registered_with_their_layers_and_nothing_else():
    model = _model("kp")
    fa = _model("fa")
    for layer in model.layers:
        assert learners.layer_of_kernel(layer.kernel) is layer
        assert learners.layer_of_kernel(layer.feedback_kernel) is None
        assert learners.layer_of_kernel(layer.bias) is None
    assert [learners.layer_of_kernel(layer.kernel) for layer in fa.layers] == [None, None]


def test_the_registry_keeps_no_layer_and_no_mirror_alive():
    kp = _model("kp")
    wm = _model("wm")
    mirror = WeightMirror(wm, learning_rate=0.1, noise_std=1.0)
    alive = [weakref.ref(layer) for layer in kp.layers + wm.layers] + [weakref.ref(mirror)]
    kernels = [layer.kernel for layer in kp.layers]
    del kp, wm, mirror
    gc.collect()
    assert [ref() for ref in alive] == [None] * 5
    assert [learners.layer_of_kernel(kernel) for kernel in kernels] == [None, None]


def test_a_dropped_mirror_trains_nothing_and_its_layers_say_so():
    model = _model("wm")
    mirror = WeightMirror(model, learning_rate=0.1, noise_std=1.0)
    assert learners.learner_of(model.layers[0]) is mirror
    del mirror
    gc.collect()
    assert learners.learner_of(model.layers[0]) is None
