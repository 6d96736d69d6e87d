"""Readers of the raw files their authors distribute: MNIST-format IDX files (gzipped or not)
and CIFAR-10's binary batches or Python pickles. Each raises a `DataError` naming the file when
it is damaged, and checks the labels."""

import gzip
import pickle

import numpy as np


_CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32

# The IDX element types: type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_bytes(path):
    """The (un-gzipped) bytes of `path`; a damaged gzip stream is a `ValueError` naming it."""
    try:
        with _open(path) as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise ValueError(f"{path} is damaged: {type(e).__name__}: {e}") from e


def read_idx(path):
    """Reads one IDX file (the MNIST format, gzipped or not) into a numpy array.

    The header is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then
    each dimension as a big-endian uint32; the data follows, big-endian, row-major.

    Raises:
        ValueError: the file is not IDX, or its size disagrees with its header.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: magic number {data[:4].hex() or 'missing'} does not "
            "start with 0000 followed by a type code in "
            f"{sorted(hex(code) for code in _IDX_DTYPES)}"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: its header announces {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path} has {len(data)} bytes but its header (shape {shape}, {dtype}) needs "
            f"{expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _read_idx_pair(images_path, labels_path, num_classes):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} (shape {images.shape}) and {labels_path} (shape {labels.shape}) "
            "are not an (N, H, W) image file and its (N,) label file"
        )
    if images.dtype != np.uint8:
        # Casting would truncate (floats in [0, 1] become zeros): refuse instead of guessing.
        raise ValueError(
            f"{images_path} holds {images.dtype} pixels in [{images.min()}, {images.max()}]; "
            "MNIST-format images are uint8 in [0, 255]. Convert them (e.g. "
            "np.round(x * 255).astype(np.uint8) for floats in [0, 1]) and write the file again."
        )
    return images[..., np.newaxis], check_labels(labels, num_classes, labels_path)


def check_labels(labels, num_classes, source):
    """`labels` as int32 after checking every one is a class in `[0, num_classes)`; else a
    `ValueError` naming `source` and the first bad index."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source} holds {labels.dtype} labels; class labels are integers")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"{source} has {bad.size} labels outside [0, {num_classes}): the first is "
            f"{int(labels[bad[0]])} at index {int(bad[0])}"
        )
    return labels.astype(np.int32)


def _chw_records_to_hwc(flat):
    """(N, 3072) rows of red, green, blue 32x32 planes -> (N, 32, 32, 3) uint8 images."""
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_cifar_binary(path):
    """Reads a CIFAR-10 binary batch: 3073-byte records, a label byte then CHW pixels.

    Returns:
        `(images, labels)`: uint8 `(N, 32, 32, 3)` and int32 `(N,)`.
    """
    data = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    if data.size % _CIFAR_RECORD_BYTES:
        raise ValueError(
            f"{path} has {data.size} bytes, not a multiple of the {_CIFAR_RECORD_BYTES}-byte "
            "CIFAR-10 record"
        )
    records = data.reshape(-1, _CIFAR_RECORD_BYTES)
    return _chw_records_to_hwc(records[:, 1:]), records[:, 0].astype(np.int32)


def read_cifar_pickle(path):
    """Reads a CIFAR-10 Python batch: a pickled dict with `b"data"` (N, 3072) and `b"labels"`.

    Unpickling runs code from the file: only read files from a source you trust.
    """
    with _open(path) as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(
            f"{path} holds data of shape {data.shape} and {len(labels)} labels, not "
            "(N, 3072) and N"
        )
    return _chw_records_to_hwc(data), labels
