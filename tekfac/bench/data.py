"""Benchmark data sets, loaded whole into memory as tensors.

Conventions shared by every loader:

* Images are float32 tensors of shape (N, C, H, W) with values in [0, 1]; labels are int64
  tensors of shape (N,).
* Loaders do not normalise. Call `normalize` on each minibatch (after `augment_cifar`, for
  CIFAR) for the classifiers; the autoencoder trains on the raw [0, 1] pixels, which are also its
  BCE targets.
* Missing, incomplete or corrupt data raises `DataError`, whose message lists the paths tried
  and says how to obtain the data.

Where the files are looked for: the `data_dir` argument (the benchmark's ``--data-dir``) alone
when given, else the directory in the ``TEKFAC_DATA`` environment variable, each either holding
the files itself or in the standard subfolder (``fashion-mnist`` or ``FashionMNIST/raw``,
``cifar-10-batches-py``, ``cifar-100-python``); without ``--data-dir``, Fashion-MNIST is finally
looked for in ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
The digits data ship with scikit-learn.

The text data set ``fortunes`` (see `load_fortunes`) holds token windows instead of images:
inputs of shape (N, T) and next-character targets of shape (N, T), both int64 indices into
`CHARACTERS`. Its files are looked for like the others (subfolder ``fortunes``), finally in
``/usr/share/games/fortunes`` (Debian package ``fortunes``).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ENV_VAR = "TEKFAC_DATA"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_HOW_TO = (
    "To obtain Fashion-MNIST, run `apt-get install -y dataset-fashion-mnist` (installs into "
    f"{DEFAULT_FASHION_MNIST_DIR}), or download the four IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
    "https://github.com/zalandoresearch/fashion-mnist into a folder and pass --data-dir FOLDER "
    f"or set {ENV_VAR}=FOLDER."
)


DEFAULT_FORTUNES_DIR = Path("/usr/share/games/fortunes")

FORTUNES_HOW_TO = (
    "To obtain the fortunes corpus, run `apt-get install -y fortunes` (installs into "
    f"{DEFAULT_FORTUNES_DIR}), or copy the fortune files of Debian's `fortunes` package "
    f"(version 1:1.99.1) into a folder and pass --data-dir FOLDER or set {ENV_VAR}=FOLDER."
)

#: The fortune files of Debian's ``fortunes`` package (1:1.99.1), in the order they are read:
#: about 2.6 MB of English text, 15,000 fortunes. A fixed list, so that other packages that
#: install into the same folder (``fortunes-min`` alone, ``fortunes-bofh-excuses``, other
#: languages) neither make a partial corpus nor change it. The package's ``.dat`` files are
#: indexes and its ``.u8`` files links to the same text; neither is read.
FORTUNES_FILES = (
    "art", "ascii-art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs",
    "education", "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law",
    "linux", "linuxcookie", "literature", "love", "magic", "medicine", "men-women",
    "miscellaneous", "news", "paradoxum", "people", "perl", "pets", "platitudes", "politics",
    "pratchett", "riddles", "science", "songs-poems", "sports", "startrek", "tao",
    "translate-me", "wisdom", "work", "zippy",
)

#: The character vocabulary of the text data sets, token index -> character: index 0 is
#: `UNKNOWN`, the token of every character not listed (in the training and the test text
#: alike; in the fortunes corpus 47 characters of 2.5 million, mostly mis-encoded accents),
#: then tab, newline and the 95 printable ASCII characters, in code-point order. Fixed rather
#: than taken from the corpus, so that the model can be built without the data (`Task.build`
#: takes no arguments) and every test character has a token.
UNKNOWN = "\ufffd"
CHARACTERS = UNKNOWN + "\t\n" + "".join(map(chr, range(32, 127)))

#: Every ``TEST_EVERY``-th fortune (counting from 1) is held out as test text; see
#: `split_fortunes`.
TEST_EVERY = 10

# Shape of one example of each data set: `load_dataset` returns inputs of shape
# (N, *INPUT_SHAPES[name]), e.g. for building a model or random stand-in inputs without the data:
# (C, H, W) images, or (T,) token windows for the text data set.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "digits": (1, 8, 8),
    "fortunes": (64,),
}

# Per-channel mean and standard deviation of the training images (in [0, 1]).
CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": ((0.3049,), (0.3758,)),
}


class DataError(Exception):
    """A data set is missing, incomplete or corrupt; the message says how to obtain it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set held in memory, or a text data set cut into windows.

    Attributes:
        name: Data set name, as passed to `load_dataset`.
        train_x: Training images, float32 of shape (N, C, H, W) in [0, 1]; for text, input
            tokens, int64 of shape (N, T).
        train_y: Training labels, int64 of shape (N,) in [0, num_classes); for text, the next
            token at every position, int64 of shape (N, T): ``train_y[i, t]`` follows
            ``train_x[i, t]`` in the text.
        test_x: Test images, float32 of shape (M, C, H, W) in [0, 1]; for text, (M, T) tokens.
        test_y: Test labels, int64 of shape (M,); for text, (M, T) next tokens.
        num_classes: Number of classes; for text, of tokens (the vocabulary's size).
        vocab: For text, the character of each token index (`CHARACTERS`); None for images.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    vocab: str | None = None


def _search_dirs(
    data_dir: str | os.PathLike | None, subfolders: tuple[str, ...], default: Path | None = None
) -> list[Path]:
    """Lists the directories to search, each root then its subfolders. An explicit `data_dir`
    is the only root (a wrong --data-dir must not silently load other data); otherwise
    $TEKFAC_DATA, then `default`."""
    env = os.environ.get(ENV_VAR)
    roots = [Path(data_dir)] if data_dir else ([Path(env)] if env else [])
    dirs = [d for root in roots for d in (root, *(root / s for s in subfolders))]
    return dirs if data_dir or default is None else [*dirs, default]


def _locate(what: str, dirs: list[Path], names: tuple[str, ...], how_to: str) -> dict[str, Path]:
    """Finds the first directory holding every file in `names` (raw, or gzipped if a name ends in
    "[.gz]").

    Returns:
        Map from each name to its path.

    Raises:
        DataError: No directory holds them all; the message lists what was missing where.
    """
    tried = []
    for directory in dirs:
        if not directory.is_dir():
            tried.append(f"{directory} (no such directory)")
            continue
        found, missing = {}, []
        for name in names:
            base = name.removesuffix("[.gz]")
            candidates = (base, base + ".gz") if name.endswith("[.gz]") else (base,)
            paths = [directory / c for c in candidates if (directory / c).is_file()]
            if paths:
                found[name] = paths[0]
            else:
                missing.append(name)
        if not missing:
            return found
        tried.append(f"{directory} (missing {', '.join(missing)})")
    if not tried:
        tried.append(f"nothing: no --data-dir given and {ENV_VAR} is not set")
    raise DataError(f"{what} not found. Tried:\n  " + "\n  ".join(tried) + "\n" + how_to)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (raw or gzipped) into a uint8 array.

    Raises:
        DataError: The file cannot be read, has the wrong magic number, or its length does not
            match the dimensions in its header.
    """
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}. {FASHION_MNIST_HOW_TO}") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: {len(data)} bytes, shorter than the {header}-byte IDX header. "
            + FASHION_MNIST_HOW_TO
        )
    found, *dims = struct.unpack(f">{1 + ndim}I", data[:header])
    if found != magic:
        raise DataError(
            f"{path} has magic number {found:#010x}, expected {magic:#010x}: not an IDX file of "
            f"{ndim}-dimensional unsigned bytes. {FASHION_MNIST_HOW_TO}"
        )
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(
            f"{path} has {len(data)} bytes, expected {expected} for dimensions {tuple(dims)}: "
            f"the file is truncated or corrupt. {FASHION_MNIST_HOW_TO}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_fashion_mnist_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images = _read_idx(images_path, 0x00000803, 3)
    labels = _read_idx(labels_path, 0x00000801, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path} holds images of size {images.shape[1:]}, expected (28, 28). "
            + FASHION_MNIST_HOW_TO
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            f"labels. {FASHION_MNIST_HOW_TO}"
        )
    if labels.size and labels.max() >= 10:
        raise DataError(f"{labels_path} holds label {labels.max()}, expected 0-9.")
    x = torch.from_numpy(images.astype(np.float32)).div_(255).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_fashion_mnist(data_dir: str | os.PathLike | None) -> Dataset:
    dirs = _search_dirs(data_dir, ("fashion-mnist", "FashionMNIST/raw"), DEFAULT_FASHION_MNIST_DIR)
    names = (
        "train-images-idx3-ubyte[.gz]",
        "train-labels-idx1-ubyte[.gz]",
        "t10k-images-idx3-ubyte[.gz]",
        "t10k-labels-idx1-ubyte[.gz]",
    )
    files = _locate("Fashion-MNIST", dirs, names, FASHION_MNIST_HOW_TO)
    train_x, train_y = _read_fashion_mnist_split(files[names[0]], files[names[1]])
    test_x, test_y = _read_fashion_mnist_split(files[names[2]], files[names[3]])
    return Dataset("fashion-mnist", train_x, train_y, test_x, test_y, num_classes=10)


# The globals a CIFAR batch may reference: numpy arrays (as pickled by numpy 1 and 2) and the
# bytes encoder of Python 3 pickles. Anything else is refused, so a bad file cannot run code.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(
    path: Path, label_key: bytes, num_classes: int, how_to: str
) -> tuple[Tensor, Tensor]:
    """Reads one CIFAR python batch: a pickled dict with uint8 b"data" of shape (n, 3072), each
    row one image in channel-major (3, 32, 32) order, and a list of n labels under `label_key`."""
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # pickle raises many exception types on corrupt input
        raise DataError(f"{path} is not a readable CIFAR batch ({e!r}). {how_to}") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} is not a dict with keys b'data' and {label_key!r}. {how_to}")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
        raise DataError(
            f"{path}: b'data' must be a uint8 array of shape (n, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}. {how_to}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {label_key!r} must hold {len(data)} integer labels, got {labels.dtype} "
            f"of shape {labels.shape}. {how_to}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes}). {how_to}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32)).div_(255)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_cifar(
    name: str,
    title: str,
    data_dir: str | os.PathLike | None,
    folder: str,
    train_files: tuple[str, ...],
    test_file: str,
    label_key: bytes,
    num_classes: int,
) -> Dataset:
    how_to = (
        f"To obtain {title}, download the python version (cifar-{num_classes}-python.tar.gz) "
        "from https://www.cs.toronto.edu/~kriz/cifar.html, extract it into a folder (giving "
        f"FOLDER/{folder}/) and pass --data-dir FOLDER or set {ENV_VAR}=FOLDER."
    )
    files = _locate(title, _search_dirs(data_dir, (folder,)), (*train_files, test_file), how_to)
    train = [_read_cifar_batch(files[f], label_key, num_classes, how_to) for f in train_files]
    test_x, test_y = _read_cifar_batch(files[test_file], label_key, num_classes, how_to)
    train_x = torch.cat([x for x, _ in train])
    train_y = torch.cat([y for _, y in train])
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes)


def _load_cifar10(data_dir: str | os.PathLike | None) -> Dataset:
    return _load_cifar(
        "cifar10",
        "CIFAR-10",
        data_dir,
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        label_key=b"labels",
        num_classes=10,
    )


def _load_cifar100(data_dir: str | os.PathLike | None) -> Dataset:
    return _load_cifar(
        "cifar100",
        "CIFAR-100",
        data_dir,
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        label_key=b"fine_labels",
        num_classes=100,
    )


def _load_digits(data_dir: str | os.PathLike | None) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, values 0-16 scaled by 1/16); `data_dir` is unused.
    The test set is a fixed 20% (359 images): `split_validation` with seed 0."""
    try:
        from sklearn.datasets import load_digits  # optional dependency, only needed here
    except ImportError as e:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).div_(16).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train_x, train_y, test_x, test_y = split_validation(x, y, fraction=0.2, seed=0)
    return Dataset("digits", train_x, train_y, test_x, test_y, num_classes=10)


# A character overstruck with a backspace ("_\bA" prints an underlined A, "A\bA" a bold one):
# the later character is the one kept.
_OVERSTRIKE = re.compile(r"[^\x08]\x08")
# Control characters other than tab and newline (the corpus has bells and stray backspaces).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A fortune file separates its fortunes with lines that hold "%" alone.
_SEPARATOR = re.compile(r"^%$", re.MULTILINE)


def read_fortune_file(path: Path) -> list[str]:
    """The fortunes of one fortune file, in file order, each cleaned.

    The file is UTF-8 text whose entries are separated by lines holding ``%`` alone. Each
    entry loses its overstrikes (``X\\bY`` becomes ``Y``), its other control characters but
    tab and newline, and its leading and trailing newlines; entries left blank are dropped.

    Raises:
        DataError: The file cannot be read or is not UTF-8 text.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}. {FORTUNES_HOW_TO}") from e
    fortunes = []
    for entry in _SEPARATOR.split(text.replace("\r\n", "\n")):
        n = 1
        while n:
            entry, n = _OVERSTRIKE.subn("", entry)
        entry = _CONTROL.sub("", entry).strip("\n")
        if entry.strip():
            fortunes.append(entry)
    return fortunes


def split_fortunes(fortunes: list[str]) -> tuple[list[str], list[str]]:
    """The deterministic train/test split of the fortunes corpus.

    Exact repeats of an earlier fortune are dropped (a few dozen fortunes appear in two
    files), so that no test fortune is also training text. Of the rest, in the given order,
    every `TEST_EVERY`-th (the 10th, 20th, ...) is test text: 10 %, spread over every file.

    Args:
        fortunes: All fortunes, in corpus order (`FORTUNES_FILES`, then file order).

    Returns:
        (train, test), each in corpus order.
    """
    unique = list(dict.fromkeys(fortunes))  # first occurrences, in order
    train = [f for i, f in enumerate(unique, 1) if i % TEST_EVERY]
    test = [f for i, f in enumerate(unique, 1) if not i % TEST_EVERY]
    return train, test


def join_fortunes(fortunes: list[str]) -> str:
    """The text of a list of fortunes: each followed by a ``%`` line, as in a fortune file."""
    return "".join(f + "\n%\n" for f in fortunes)


# Token of each code point below 128; every other code point is `UNKNOWN` (index 0).
_TOKEN_OF_ASCII = np.zeros(128, dtype=np.int64)
_TOKEN_OF_ASCII[[ord(c) for c in CHARACTERS[1:]]] = np.arange(1, len(CHARACTERS))


def encode(text: str) -> Tensor:
    """The tokens of ``text``: int64 of shape (len(text),), indices into `CHARACTERS`, with
    characters outside it mapped to 0 (`UNKNOWN`)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    tokens = np.where(codes < 128, _TOKEN_OF_ASCII[np.minimum(codes, 127)], 0)
    return torch.from_numpy(tokens.astype(np.int64))


def decode(tokens: Tensor) -> str:
    """The text of 1-D ``tokens`` (indices into `CHARACTERS`); 0 decodes to `UNKNOWN`."""
    return "".join(CHARACTERS[i] for i in tokens.tolist())


def text_windows(tokens: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Cuts a token stream into consecutive, non-overlapping windows for next-token prediction.

    Window ``i`` covers ``tokens[i·length : (i+1)·length + 1]``: its inputs are the first
    ``length`` tokens, its targets the last ``length`` (the inputs shifted by one), so that every
    token but the first is a target exactly once. A tail shorter than a window is dropped.

    Args:
        tokens: int64 token stream of shape (L,).
        length: Window length T.

    Returns:
        (x, y), int64 of shape (N, T) with N = (L - 1) // T: inputs and targets.
    """
    n = max(0, (len(tokens) - 1) // length)
    x = tokens[: n * length].reshape(n, length)
    y = tokens[1 : n * length + 1].reshape(n, length)
    return x, y


def load_fortunes(data_dir: str | os.PathLike | None) -> Dataset:
    """The fortunes corpus as a character-level language-modelling data set.

    Reads the `FORTUNES_FILES` (`read_fortune_file`), splits the fortunes (`split_fortunes`),
    joins each part back into fortune-file text (`join_fortunes`), encodes it (`encode`) and
    cuts it into windows of ``INPUT_SHAPES["fortunes"]`` = (64,) tokens (`text_windows`). With
    the Debian package: about 36,000 training and 4,000 test windows (2.3 M and 0.26 M
    characters).

    Raises:
        DataError: A file is missing or unreadable, or a part is shorter than one window.
    """
    dirs = _search_dirs(data_dir, ("fortunes",), DEFAULT_FORTUNES_DIR)
    files = _locate("Fortunes corpus", dirs, FORTUNES_FILES, FORTUNES_HOW_TO)
    fortunes = [f for name in FORTUNES_FILES for f in read_fortune_file(files[name])]
    (length,) = INPUT_SHAPES["fortunes"]
    parts = []
    for part, texts in zip(("training", "test"), split_fortunes(fortunes)):
        x, y = text_windows(encode(join_fortunes(texts)), length)
        if len(x) == 0:
            raise DataError(f"the fortunes in {files[FORTUNES_FILES[0]].parent} leave less than "
                            f"one window of {length + 1} characters of {part} text. "
                            + FORTUNES_HOW_TO)
        parts += [x, y]
    return Dataset("fortunes", *parts, num_classes=len(CHARACTERS), vocab=CHARACTERS)


_LOADERS = {
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "digits": _load_digits,
    "fortunes": load_fortunes,
}
DATASET_NAMES = tuple(_LOADERS)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads a benchmark data set into memory.

    Args:
        name: One of "fashion-mnist" (1x28x28), "cifar10", "cifar100" (3x32x32), "digits"
            (1x8x8) or "fortunes" (text, windows of 64 characters; `load_fortunes`).
        data_dir: Folder holding the data files or their standard subfolder; when given, the
            only place searched. Otherwise $TEKFAC_DATA, then (Fashion-MNIST)
            /usr/share/datasets/fashion-mnist or (fortunes) /usr/share/games/fortunes.

    Returns:
        The data set, images in [0, 1] and not normalised, or token windows.

    Raises:
        ValueError: Unknown name.
        DataError: The data cannot be found or read; the message says how to obtain it.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    return _LOADERS[name](data_dir)


def normalize(x: Tensor, name: str) -> Tensor:
    """Standardises each channel with the data set's training mean and std (`CHANNEL_STATS`).

    Args:
        x: Images of shape (N, C, H, W) in [0, 1].
        name: Data set name, a key of `CHANNEL_STATS`.

    Returns:
        (x - mean) / std, same shape, dtype and device as `x`.
    """
    if name not in CHANNEL_STATS:
        raise ValueError(f"no channel statistics for {name!r}; known: {', '.join(CHANNEL_STATS)}")
    mean, std = CHANNEL_STATS[name]
    if x.dim() != 4 or x.shape[1] != len(mean):
        raise ValueError(
            f"{name} images must have shape (N, {len(mean)}, H, W), got {tuple(x.shape)}"
        )
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t


def split_validation(
    x: Tensor, y: Tensor, fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Holds out a random fraction of the examples, e.g. for hyper-parameter tuning.

    Args:
        x: Inputs, first dimension N.
        y: Targets, first dimension N.
        fraction: Share of the examples to hold out, in (0, 1); rounded to a whole count.
        seed: Seed of the permutation; the same seed gives the same split.

    Returns:
        (train_x, train_y, val_x, val_y); the two parts are disjoint and cover every example.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y differ in length: {n} vs {len(y)}")
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        raise ValueError(
            f"fraction={fraction} of {n} examples leaves an empty training or validation set"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    train, val = perm[: n - n_val], perm[n - n_val :]
    return x[train], y[train], x[val], y[val]


def augment_cifar(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Standard CIFAR augmentation: random crop with zero padding, then random horizontal flip.

    Each image is zero-padded by `padding` pixels on every side and cropped back to its size at
    a uniformly random offset, i.e. shifted by up to `padding` pixels in each direction with
    zeros filling in; then flipped left-right with probability 1/2. Draws come from `generator`
    (a CPU generator), so the result is a function of `x` and the generator's state.

    Args:
        x: Images of shape (N, C, H, W), on any device.
        generator: Source of randomness.
        padding: Maximum shift in pixels.

    Returns:
        Augmented images, same shape, dtype and device as `x`.
    """
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def iterate_minibatches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields one epoch of shuffled minibatches.

    Args:
        x: Inputs, first dimension N.
        y: Targets, first dimension N.
        batch_size: Examples per minibatch.
        generator: CPU generator for the shuffling permutation.
        drop_last: Skip the final minibatch if it would be smaller than `batch_size`.

    Yields:
        (x_batch, y_batch), each indexed by the same slice of one random permutation.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y differ in length: {n} vs {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    perm = torch.randperm(n, generator=generator).to(x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]
        yield x[idx], y[idx]
