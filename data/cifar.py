"""CIFAR-100 from the standard `cifar-100-python/` pickles, read with a restricted unpickler."""
import os
import pickle
import stat

import numpy as np
import torch

from micronet_cifar100.errors import DataError, DataNotFound, DataPermission, DownloadFailed, first_line

# CIFAR-10 statistics: the original recipe normalised CIFAR-100 with these, and we keep its numbers.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 100
FOLDER = "cifar-100-python"
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
_SPLITS = {True: ("train", TRAIN_IMAGES), False: ("test", TEST_IMAGES)}

# The only globals a CIFAR pickle needs: numpy array/dtype reconstruction (numpy 1.x and 2.x module
# paths; `_frombuffer` is how protocol 5 stores arrays), plus the bytes helpers that Python 3 emits
# when it writes a protocol-2 pickle. Names arrive un-mapped, hence `__builtin__` next to `builtins`.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("codecs", "encode"),
    ("__builtin__", "bytes"),
    ("builtins", "bytes"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Data files come from the network: a pickle may name any callable, so only allow-listed ones resolve."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # latin1 round-trips the py2 byte strings numpy stored
        self._path = path

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise DataError(f"{self._path}: refusing to unpickle {module}.{name}; the file is not a "
                            f"CIFAR-100 pickle; delete it and re-download")
        return super().find_class(module, name)


def _download(root):
    """Fetch and unpack the official archive into root/cifar-100-python (md5-checked by torchvision).

    Only the archive helper is used, not `CIFAR100(...)`, whose constructor would also read the pickles
    with an unrestricted `pickle.load`; the restricted reader below stays the only one.
    """
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive
    download_and_extract_archive(CIFAR100.url, root, filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)


def _described(e):
    """An exception as one short line, so the user's error message stays on one line."""
    return f"{type(e).__name__}: {first_line(e)}"


def _denied(path, doing="read"):
    return DataPermission(f"cannot {doing} {path}: permission denied; give this user access to it")


def _is_file(path):
    """Whether `path` is a file; a folder on the way that may not be searched is a permission error,
    not a missing file (os.path.isfile would say False for both)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except PermissionError:
        raise _denied(path) from None
    except OSError:
        return False


def _read_pickle(path):
    try:
        f = open(path, "rb")
    except PermissionError:
        raise _denied(path) from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({_described(e)})") from None
    try:
        with f:
            return _CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # any decoding failure of an untrusted file means the file is bad
        raise DataError(f"{path} is truncated or corrupt ({_described(e)}); delete it "
                        f"and re-run the unpack script or re-download") from None


def _validate(obj, path, split, expected):
    """Return (data [N,3072] uint8, labels [N] int64) or raise DataError naming what is wrong."""
    def bad(problem):
        return DataError(f"{path} is not a valid CIFAR-100 {split} file ({problem}); delete it and "
                         f"re-run the unpack script or re-download")

    if not isinstance(obj, dict):
        raise bad(f"holds a {type(obj).__name__}, expected a dict")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    for key in ("data", "fine_labels"):
        if key not in obj:
            raise bad(f"missing key {key!r}")
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (expected, 3072):
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise bad(f"'data' is a {desc}, expected uint8 of shape ({expected}, 3072)")
    labels = np.asarray(obj["fine_labels"])
    if labels.shape != (expected,) or labels.dtype.kind not in "iu":
        raise bad(f"'fine_labels' has shape {labels.shape} and dtype {labels.dtype}, "
                  f"expected {expected} integers")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise bad(f"labels span {labels.min()}..{labels.max()}, expected 0..{NUM_CLASSES - 1}")
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if (counts == 0).any():
        raise bad(f"class {int(np.argmin(counts))} has no images")
    if not data.flags.writeable:  # protocol-5 pickles can hand back read-only buffers; torch wants writable
        data = data.copy()
    return data, labels.astype(np.int64)


def load_cifar100(root, train: bool, download: bool = True):
    """Load a CIFAR-100 split: (images uint8 [N,3,32,32], labels int64 [N]), N = 50,000 or 10,000.

    Reads root/cifar-100-python/{train,test}; downloads it when missing and `download` is set.
    """
    root = os.path.expanduser(os.fspath(root))
    if os.path.basename(os.path.normpath(root)) == FOLDER and not os.path.isdir(os.path.join(root, FOLDER)):
        root = os.path.dirname(os.path.normpath(root))  # the user named the data folder itself
    split, expected = _SPLITS[bool(train)]
    folder = os.path.join(root, FOLDER)
    path = os.path.join(folder, split)
    if not _is_file(path):
        if not download:
            raise DataNotFound(f"CIFAR-100 {split} data not found at {path}")
        try:
            _download(root)
        except PermissionError:
            raise _denied(folder, "write CIFAR-100 to") from None
        except Exception as e:
            raise DownloadFailed(f"could not download CIFAR-100 to {folder} ({_described(e)})") from None
        if not _is_file(path):
            raise DownloadFailed(f"the CIFAR-100 download did not produce {path}; delete {folder} and retry")
    data, labels = _validate(_read_pickle(path), path, split, expected)
    # R, G and B planes are stored row-major one after another, which is exactly [3,32,32] per image.
    return torch.from_numpy(data).view(expected, 3, 32, 32), torch.from_numpy(labels)
