"""What each dataset holds (`info`), and the error of data that cannot be trained on."""

import dataclasses


class DataError(ValueError):
    """The data on disk cannot be trained on: a damaged or missing file, splits that disagree."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds.

    Attributes:
        name: the name `load` takes.
        num_classes: number of labels; labels are `0 .. num_classes - 1`.
        image_shape: `(height, width, channels)` of one image (ImageNet: the default crop).
        num_train: examples in the `"train"` split.
        num_test: examples in the held-out split (`"test"`; ImageNet: `"validation"`).
        splits: the split names `load` accepts.
    """

    name: str
    num_classes: int
    image_shape: tuple
    num_train: int
    num_test: int
    splits: tuple = ("train", "test")


_INFO = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), 60000, 10000),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), 60000, 10000),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), 50000, 10000),
    "imagenet": DatasetInfo(
        "imagenet", 1000, (224, 224, 3), 1281167, 50000, ("train", "validation")
    ),
}
NAMES = tuple(_INFO)


def info(name):
    """Returns the `DatasetInfo` (classes, image shape, split sizes) of dataset `name`."""
    return _INFO[_check_name(name)]


def _check_name(name):
    if name not in _INFO:
        raise ValueError(f"name={name!r} is not one of {NAMES}")
    return name


def _check_split(name, split):
    splits = _INFO[name].splits
    if split not in splits:
        raise ValueError(f"split={split!r} is not one of {splits} for dataset {name!r}")
    return split
