"""Model builders whose every Dense and convolution is a keras_wt feedback layer.

Each builder takes `feedback=` (one of `keras_wt.ALGORITHMS`), passes it to every Dense/Conv
layer, and returns a functional `keras.Model`. Batch norm, pooling, padding and additions are
stock Keras layers with their ordinary gradients. Nothing is kept on the Python side at run
time, so the models compile with `jit_compile=True` and run under `tf.distribute`.

* `mlp`: the fully connected network of Akrout et al.'s public NumPy code (sigmoid units,
  `ReferenceNormal` weights), trained with `reference_loss()`.
* `cnn`: a small convolutional network for MNIST-like and CIFAR-like images.
* `resnet18`, `resnet50`: ImageNet ResNets, v1.5 (torchvision layout and parameter counts).
* `resnet20`: the CIFAR ResNet of He et al. (2016), with 1x1 projection shortcuts.
* `get(name, **kwargs)`: a builder by name.

Every model ends in a `Dense` named `"classifier"` and an `Activation` named `"predictions"`
computed in the policy's variable dtype (float32 under `"mixed_float16"`), so losses never
see float16 outputs.

Parameter counts: `count_forward_params(model)` counts what the usual tables count — kernels,
biases, batch-norm γ and β — and leaves out the feedback kernels `B` (extra, non-trainable
weights of `fa`, `wm`, `kp` layers) and the batch-norm moving statistics (buffers, not
parameters). With it, `resnet18()` has 11,689,512 and `resnet50()` 25,557,032 parameters for
every algorithm. `model.count_params()` counts every weight, those included.

One module per kind: `plain` (`mlp`, `cnn`), `resnets`, `reference` (`ReferenceNormal`,
`SummedSigmoidCrossEntropy`, `reference_loss`), `builder` (the layer-making machinery they
share), `params` (the counts); `BUILDERS` and `get` here.
"""

from keras_wt import dfa
from keras_wt.models.builder import BN_EPSILON
from keras_wt.models.builder import BN_MOMENTUM
from keras_wt.models.params import count_forward_params
from keras_wt.models.params import feedback_params
from keras_wt.models.plain import cnn
from keras_wt.models.plain import mlp
from keras_wt.models.reference import ReferenceNormal
from keras_wt.models.reference import SummedSigmoidCrossEntropy
from keras_wt.models.reference import reference_loss
from keras_wt.models.resnets import resnet18
from keras_wt.models.resnets import resnet20
from keras_wt.models.resnets import resnet50

__all__ = [
    "BN_EPSILON", "BN_MOMENTUM", "BUILDERS", "ReferenceNormal", "SummedSigmoidCrossEntropy",
    "cnn", "count_forward_params", "feedback_params", "get", "mlp", "reference_loss",
    "resnet18", "resnet20", "resnet50",
]

BUILDERS = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet20": resnet20,
}


def get(name, **kwargs):
    """Builds the model `name` (one of `BUILDERS`: `"mlp"`, `"cnn"`, `"resnet18"`, ...); with
    `feedback="dfa"`, with its `keras_wt.dfa.DirectFeedback` marker."""
    if not isinstance(name, str) or name not in BUILDERS:
        raise ValueError(f"model name={name!r} is not one of {tuple(BUILDERS)}")
    # A direct algorithm (dfa) routes the output error to every layer (keras_wt.dfa).
    return dfa.maybe_direct(BUILDERS[name](**kwargs), kwargs.get("feedback", "bp"))
