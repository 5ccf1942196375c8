"""Image classification data for the DEQ demo: CIFAR-10, Fashion-MNIST and scikit-learn's digits.

Every loader returns an :class:`ImageData` with uint8 images of shape (N, C, H, W)
in memory.  No download happens unless stated: CIFAR-10 is read from the standard
``cifar-10-batches-py`` folder (fetched through torchvision only when torchvision
is installed and the network allows), Fashion-MNIST from IDX files (by default
where Debian's ``dataset-fashion-mnist`` package puts them), digits from
scikit-learn's bundled copy.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "DataError", "ImageData", "load_dataset", "load_cifar10", "load_fashion_mnist",
           "load_digits", "read_idx"]

#: Dataset names accepted by :func:`load_dataset`.
DATASETS = ("cifar10", "fashion-mnist", "digits")

#: Where Debian's dataset-fashion-mnist package installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says what is missing and how to get it."""


@dataclass
class ImageData:
    """A classification dataset held in memory.

    Attributes
    ----------
    name : str
    train_x, test_x : ndarray of uint8, shape (N, C, H, W)
    train_y, test_y : ndarray of int64, shape (N,)
    classes : tuple of str
    max_value : float
        Largest possible pixel value (255, or 16 for digits); pixels / max_value lie in [0, 1].
    source : str
        Where the data was read from.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple
    max_value: float
    source: str

    @property
    def shape(self):
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])

    def limited(self, n_train=None, n_test=None):
        """The first ``n_train`` training and ``n_test`` test images (None: all)."""
        tr = slice(None) if n_train is None else slice(0, n_train)
        te = slice(None) if n_test is None else slice(0, n_test)
        return ImageData(self.name, self.train_x[tr], self.train_y[tr], self.test_x[te], self.test_y[te],
                         self.classes, self.max_value, self.source)

    def channel_stats(self):
        """Per-channel mean and standard deviation of the training pixels scaled to [0, 1], shape (C,) each."""
        x = self.train_x.astype(np.float64) / self.max_value
        return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3)) + 1e-8


# ---------------------------------------------------------------- CIFAR-10 (pickled batches)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds NumPy arrays (and plain containers): the batches are pickles."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        module = module.replace("numpy._core", "numpy.core")  # NumPy 2 renamed numpy.core to numpy._core
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core")
        return super().find_class(module, name)


def _unpickle(path):
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # a truncated or foreign pickle fails in many ways
        raise DataError(f"{path} is not a readable CIFAR-10 batch file ({type(exc).__name__}: {exc}); "
                        f"re-extract {CIFAR10_URL}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict, got {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path):
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path} is not a CIFAR-10 batch: it lacks 'data' or 'labels' (has {sorted(d)})")
    try:
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: 'data' or 'labels' are not arrays of pixels and class numbers ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and "
                        f"{labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar10(data_dir):
    base = Path(data_dir)
    for folder in (base / CIFAR10_FOLDER, base):
        if (folder / "batches.meta").is_file() and (folder / "test_batch").is_file():
            return folder
    return None


def _download_cifar10(root):
    try:
        import torchvision
    except ImportError:
        return "torchvision is not installed, so no download was tried"
    try:
        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
    except Exception as exc:  # no network, refused, checksum error, ...
        return f"the download through torchvision failed ({type(exc).__name__}: {exc})"
    return None


def load_cifar10(data_dir="data", download=True):
    """CIFAR-10 from the standard ``cifar-10-batches-py`` folder of pickled batches.

    Parameters
    ----------
    data_dir : str or Path, default "data"
        The folder that holds ``cifar-10-batches-py/`` (torchvision's ``root``),
        or that folder itself.
    download : bool, default True
        When the folder is missing, try torchvision's downloader into ``data_dir``
        (only if torchvision is installed; needs the network).

    Returns
    -------
    ImageData
        50,000 training and 10,000 test images of shape (3, 32, 32), uint8, 10 classes.

    Raises
    ------
    DataError
        When the folder or one of its files (data_batch_1..5, test_batch,
        batches.meta) is missing or malformed; the message says how to get it.
    """
    folder = _find_cifar10(data_dir)
    why = None
    if folder is None and download:
        why = _download_cifar10(data_dir)
        folder = _find_cifar10(data_dir)
    if folder is None:
        raise DataError(
            f"CIFAR-10 not found: no {CIFAR10_FOLDER}/ with batches.meta and test_batch in {str(data_dir)!r}"
            + (f" ({why})" if why else "") + f". Download {CIFAR10_URL}, extract it there "
            f"(tar xzf cifar-10-python.tar.gz -C {data_dir}), or install torchvision on a machine with network "
            "access; or choose --dataset fashion-mnist or --dataset digits")
    missing = [n for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
               if not (folder / n).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {folder} is incomplete: missing {', '.join(missing)}; "
                        f"re-extract {CIFAR10_URL}")
    parts = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch")
    meta = _unpickle(folder / "batches.meta")
    names = meta.get("label_names")
    if names is None:
        raise DataError(f"{folder / 'batches.meta'} has no 'label_names'")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    for i, (_, labels) in enumerate(parts, 1):  # name the batch file that holds a bad label
        _checked_labels(labels, len(classes), folder / f"data_batch_{i}")
    _checked_labels(test_y, len(classes), folder / "test_batch")
    train = folder / "data_batch_1"
    return _checked(ImageData("cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                              test_x, test_y, classes, 255.0, str(folder)),
                    (train, train, folder / "test_batch", folder / "test_batch"))


# ---------------------------------------------------------------- IDX files (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C
    int32, 0x0D float32, 0x0E float64), the number of dimensions, the dimensions
    as big-endian int32, then the data, big-endian, C order.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ndarray
        In native byte order; uint8 files come back as uint8.

    Raises
    ------
    DataError
        For a missing or unreadable file, a broken gzip stream (truncated, bad CRC), a bad
        magic number, a header cut short, negative dimensions, or a size that does not match
        the header; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} not found")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as fh:
                raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a cut stream an EOFError
        raise DataError(f"{path} cannot be read: {type(exc).__name__}: {exc or 'the file ends early'}; "
                        "download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}; expected 00 00, a type code "
                        "and the number of dimensions)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: the header announces {ndim} dimensions, but the file has only {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: negative dimensions {dims} in the header")
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize  # Python integers: no overflow
    if len(raw) != expected:
        raise DataError(f"{path}: header says shape {dims} of {dtype.name} ({expected} bytes), but the file has "
                        f"{len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(folder, stem):
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(data_dir=FASHION_MNIST_DIR):
    """Fashion-MNIST from its four IDX files (``train-images-idx3-ubyte`` etc., gzip or not).

    Parameters
    ----------
    data_dir : str or Path, default "/usr/share/datasets/fashion-mnist"
        Folder with the files; the default is where Debian's ``dataset-fashion-mnist`` package installs them.

    Returns
    -------
    ImageData
        60,000 training and 10,000 test images of shape (1, 28, 28), uint8, 10 classes.

    Raises
    ------
    DataError
        When a file is missing or malformed; the message says how to get them.
    """
    folder = Path(data_dir)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    files = [_idx_file(folder, s) for s in stems]
    missing = [s for s, f in zip(stems, files) if f is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {str(folder)!r}: missing {', '.join(missing)} (.gz or not). On Debian/"
            "Ubuntu: sudo apt-get install dataset-fashion-mnist (installs them in "
            f"{FASHION_MNIST_DIR}); or download them from https://github.com/zalandoresearch/fashion-mnist "
            "into a folder and pass it as --data-dir")
    tr_x, tr_y, te_x, te_y = (read_idx(f) for f in files)
    for x, y, fx, fy in ((tr_x, tr_y, files[0], files[1]), (te_x, te_y, files[2], files[3])):
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{fx}: expected uint8 images of shape (N, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{fy}: expected {x.shape[0]} labels (one per image of {fx.name}), got shape {y.shape}")
    return _checked(ImageData("fashion-mnist", tr_x[:, None], _labels(tr_y, files[1]), te_x[:, None],
                              _labels(te_y, files[3]), FASHION_CLASSES, 255.0, str(folder)),
                    (files[0], files[1], files[2], files[3]))


def _checked_labels(y, n_classes, path):
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise DataError(f"{path}: label {int(y[bad][0])} of image {int(np.argmax(bad))} is not a class (expected 0 "
                        f"to {n_classes - 1}; {int(bad.sum())} such labels)")


def _labels(y, path):
    """Integer labels as int64; a label file of another type is an error naming ``path``."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: expected integer class labels, got {y.dtype}")
    return y.astype(np.int64)


def _checked(d, files):
    """``d`` once its images and labels make a usable dataset; ``files`` are (train images, train labels, test
    images, test labels), named in the errors."""
    for x, y, fx, fy in ((d.train_x, d.train_y, files[0], files[1]), (d.test_x, d.test_y, files[2], files[3])):
        if x.shape[0] == 0:
            raise DataError(f"{fx} holds no images")
        _checked_labels(y, len(d.classes), fy)
    if d.train_x.shape[1:] != d.test_x.shape[1:]:
        raise DataError(f"{files[2]}: test images of shape {d.test_x.shape[1:]}, but the training images in "
                        f"{files[0]} have {d.train_x.shape[1:]}")
    _, h, w = d.train_x.shape[1:]
    if h != w or h < 4:
        raise DataError(f"{files[0]}: expected square images of at least 4x4 pixels, got {h}x{w}")
    return d


# ---------------------------------------------------------------- scikit-learn digits

def load_digits(test_fraction=0.2, seed=0):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download).

    Parameters
    ----------
    test_fraction : float, default 0.2
        Fraction held out for testing (stratified split).
    seed : int, default 0
        Seed of the split.

    Returns
    -------
    ImageData
        Images of shape (1, 8, 8), uint8 with values 0..16 (``max_value`` 16), 10 classes.

    Raises
    ------
    DataError
        When scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError(f"--dataset digits needs scikit-learn (pip install '.[demos]'): {exc}") from exc
    bunch = sk_load_digits()
    x = bunch.images.astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return ImageData("digits", tr_x, tr_y, te_x, te_y, tuple(str(i) for i in range(10)), 16.0,
                     "sklearn.datasets.load_digits")


def load_dataset(name, data_dir=None, download=True):
    """Load a dataset of :data:`DATASETS` by name.

    Parameters
    ----------
    name : {"cifar10", "fashion-mnist", "digits"}
    data_dir : str or Path, optional
        Where the files are (default: "data" for CIFAR-10, Debian's folder for Fashion-MNIST; unused for digits).
    download : bool, default True
        CIFAR-10 only: try torchvision's downloader when the files are missing.

    Returns
    -------
    ImageData

    Raises
    ------
    ValueError
        For an unknown name.
    DataError
        For missing or malformed files.
    """
    if name == "cifar10":
        return load_cifar10("data" if data_dir is None else data_dir, download=download)
    if name == "fashion-mnist":
        return load_fashion_mnist(FASHION_MNIST_DIR if data_dir is None else data_dir)
    if name == "digits":
        return load_digits()
    raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}, got {name!r}")
