"""The shape of the weight mirror's noise for a feedback layer whose input shape is not fully
known (`FeedbackLayer.mirror_input_shape`), found from the layer's linear op itself."""

import numpy as np
from keras import ops

from keras_wt import backend


def mirror_input_shape(layer):
    """The shape of one sample of the weight mirror's noise (`keras_wt.mirror`) for the built
    feedback layer `layer`: its input shape without the batch axis
    (`layer.feedback_input_shape[1:]`), exactly, where every dimension is known.

    A dimension still unknown (`None`: the sequence length of a keras-hub Transformer) is 1
    when the layer's linear op maps the slices of its input along that axis independently,
    each with the same kernel: every axis but the last for `Dense`, the input axes that reach
    the output without meeting the kernel for `EinsumDense`. The mirror's step is then the
    same average whatever the length, since its link counts `C` come from the same shape.
    Which axes qualify is found from `linear` itself (on random inputs, the output of a
    length-2 input must be the outputs of its two slices, side by side), so no layer type
    needs code of its own.

    Raises:
        ValueError: the layer is not built, or an unknown dimension is one that the linear op
            mixes (a convolution's spatial axes): the noise needs its size.
    """
    shape = layer.feedback_input_shape
    if shape is None:
        raise ValueError(
            f"Layer {layer.name!r} is not built: the weight mirror's noise has the shape of its "
            "input. Call the model on a batch first (the build() of a subclassed model does "
            "not build the layers it holds; a call does)."
        )
    shape = tuple(shape[1:])
    unknown = [axis for axis, size in enumerate(shape) if size is None]
    for axis in unknown:
        if not _slices_independent(layer, shape, axis):
            raise ValueError(
                f"Layer {layer.name!r} has input shape {tuple(layer.feedback_input_shape)}: the "
                f"weight mirror's noise needs the size of axis {axis + 1}, which the layer's "
                "linear op mixes across positions (the spatial axes of a convolution). Give "
                "the model a fixed input size (e.g. keras.Input((32, 32, 3)))."
            )
    return tuple(1 if size is None else size for size in shape)


def _slices_independent(layer, sample_shape, axis):
    """Whether `layer.linear` maps the slices of a sample along `axis` (of `sample_shape`, no
    batch axis) independently and alike: on a sample of length 2 there (1 on other unknown axes),
    its output is the outputs of the two slices, concatenated along the one output axis that has
    length 2 where a slice's has length 1. Inputs and kernel are Gaussian (so no sum cancels by
    chance), compared to float32 rounding. Computed eagerly, also while a function is traced."""
    rng = np.random.RandomState(0)
    shape = [1] + [1 if size is None else size for size in sample_shape]
    shape[axis + 1] = 2
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal(tuple(layer.kernel.shape)).astype(np.float32)
    slices = [np.take(x, [i], axis=axis + 1) for i in range(2)]
    with backend.eager_scope():
        try:
            whole = layer.linear(ops.convert_to_tensor(x), ops.convert_to_tensor(kernel))
            parts = [
                layer.linear(ops.convert_to_tensor(part), ops.convert_to_tensor(kernel))
                for part in slices
            ]
        except (ValueError, *backend.KERNEL_ERRORS):  # e.g. a "valid" window wider than 2
            return False
        whole, parts = ops.convert_to_numpy(whole), [ops.convert_to_numpy(p) for p in parts]
    whole_shape, part_shape = whole.shape, parts[0].shape
    if parts[1].shape != part_shape or len(whole_shape) != len(part_shape):
        return False
    differ = [i for i, (a, b) in enumerate(zip(whole_shape, part_shape)) if a != b]
    if len(differ) != 1 or (whole_shape[differ[0]], part_shape[differ[0]]) != (2, 1):
        return False
    joined = np.concatenate(parts, axis=differ[0])
    return bool(np.allclose(whole, joined, rtol=1e-5, atol=1e-5 * np.abs(whole).max()))
