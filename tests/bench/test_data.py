"""Tests of tekfac.bench.data on tiny files written in the real formats."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tekfac.bench import data
from tekfac.bench.data import (
    DATASET_NAMES,
    INPUT_SHAPES,
    DataError,
    augment_cifar,
    iterate_minibatches,
    load_dataset,
    normalize,
    split_validation,
)
from tests.bench.test_text import write_fortunes

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Hides $TEKFAC_DATA and the system Fashion-MNIST and fortunes, so only the tests' files
    are found."""
    monkeypatch.delenv("TEKFAC_DATA", raising=False)
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "no-default")
    monkeypatch.setattr(data, "DEFAULT_FORTUNES_DIR", tmp_path / "no-default")


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False, cut: int = 0) -> Path:
    """Writes `array` as an IDX file of unsigned bytes, optionally gzipped and with `cut` bytes
    cut off the end."""
    raw = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_fashion_mnist(directory: Path, gz: bool = False, seed: int = 0) -> dict:
    """Writes 3 training and 2 test images with labels; returns the arrays by file stem."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([9, 0, 4], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([1, 7], dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(directory / stem, array, IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reads_idx_files_exactly(tmp_path, gz):
    arrays = write_fashion_mnist(tmp_path, gz=gz)
    ds = load_dataset("fashion-mnist", tmp_path)

    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (3, 1, 28, 28) and ds.train_x.dtype == torch.float32
    assert ds.test_x.shape == (2, 1, 28, 28)
    expected = torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32) / 255
    assert torch.equal(ds.train_x[:, 0], expected)
    expected = torch.tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32) / 255
    assert torch.equal(ds.test_x[:, 0], expected)
    assert ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == [9, 0, 4] and ds.test_y.tolist() == [1, 7]


@pytest.mark.parametrize("subfolder", ["fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_found_in_standard_subfolder(tmp_path, subfolder):
    write_fashion_mnist(tmp_path / subfolder)
    assert load_dataset("fashion-mnist", tmp_path).train_y.tolist() == [9, 0, 4]


def test_fashion_mnist_found_through_env_var(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "fashion-mnist", gz=True)
    monkeypatch.setenv("TEKFAC_DATA", str(tmp_path))
    assert load_dataset("fashion-mnist").test_y.tolist() == [1, 7]


def test_fashion_mnist_explicit_dir_comes_before_env_var(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "explicit", seed=1)
    write_fashion_mnist(tmp_path / "env", seed=2)
    monkeypatch.setenv("TEKFAC_DATA", str(tmp_path / "env"))
    explicit = load_dataset("fashion-mnist", tmp_path / "explicit")
    assert torch.equal(
        explicit.train_x, load_dataset("fashion-mnist", tmp_path / "explicit").train_x
    )
    assert not torch.equal(explicit.train_x, load_dataset("fashion-mnist").train_x)


def test_fashion_mnist_missing_names_every_path_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TEKFAC_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    for path in [
        tmp_path / "env",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "env" / "FashionMNIST" / "raw",
        tmp_path / "no-default",
    ]:
        assert f"{path} (no such directory)" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "https://github.com/zalandoresearch/fashion-mnist" in message
    assert "--data-dir" in message and "TEKFAC_DATA" in message


def test_explicit_data_dir_is_the_only_place_searched(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "env", seed=2)
    monkeypatch.setenv("TEKFAC_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", tmp_path / "given")
    message = str(info.value)
    for path in [
        tmp_path / "given",
        tmp_path / "given" / "fashion-mnist",
        tmp_path / "given" / "FashionMNIST" / "raw",
    ]:
        assert f"{path} (no such directory)" in message
    assert str(tmp_path / "env") not in message and "no-default" not in message


def test_fashion_mnist_incomplete_dir_names_missing_files(tmp_path):
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]\)"):
        load_dataset("fashion-mnist", tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_wrong_magic_is_reported(tmp_path, gz):
    write_fashion_mnist(tmp_path, gz=gz)
    labels = np.array([9, 0, 4], dtype=np.uint8)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, IMAGES_MAGIC, gz=gz)
    with pytest.raises(DataError, match="magic number 0x00000803, expected 0x00000801") as info:
        load_dataset("fashion-mnist", tmp_path)
    assert "train-labels-idx1-ubyte" in str(info.value)


@pytest.mark.parametrize("cut", [1, 2361])  # a pixel short; 7 of the 16 header bytes left
def test_idx_truncated_file_is_reported(tmp_path, cut):
    write_fashion_mnist(tmp_path)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, IMAGES_MAGIC, cut=cut)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte .*truncated") as info:
        load_dataset("fashion-mnist", tmp_path)
    assert "zalandoresearch" in str(info.value)  # says how to obtain a good copy


def test_idx_truncated_gzip_stream_is_reported(tmp_path):
    write_fashion_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"cannot read .*train-images-idx3-ubyte\.gz") as info:
        load_dataset("fashion-mnist", tmp_path)
    assert "zalandoresearch" in str(info.value)


def test_idx_count_mismatch_is_reported(tmp_path):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1], dtype=np.uint8), LABELS_MAGIC)
    with pytest.raises(DataError, match=r"holds 2 images but .* holds 1 labels"):
        load_dataset("fashion-mnist", tmp_path)


def test_idx_wrong_image_size_is_reported(tmp_path):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 32, 32)), IMAGES_MAGIC)
    with pytest.raises(DataError, match=r"size \(32, 32\), expected \(28, 28\)"):
        load_dataset("fashion-mnist", tmp_path)


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", REAL_FASHION_MNIST)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.min() == 0 and ds.train_x.max() == 1
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.train_y[:3].tolist() == [9, 0, 0]  # ankle boot, T-shirt, T-shirt


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """The CIFAR row layout, written out: 1024 red, then 1024 green, then 1024 blue values, each
    plane in row-major order."""
    n = len(images)
    return np.concatenate([images[:, c].reshape(n, 1024) for c in range(3)], axis=1)


def write_cifar_batch(path: Path, images: np.ndarray, labels: dict) -> None:
    batch = {b"batch_label": b"testing", b"data": cifar_rows(images), b"filenames": []}
    batch.update({key: [int(v) for v in value] for key, value in labels.items()})
    path.write_bytes(pickle.dumps(batch, protocol=2))


def random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar10(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    train_x, test_x = random_images(rng, 10), random_images(rng, 3)
    train_y, test_y = rng.integers(0, 10, 10), np.array([3, 9, 0])
    for i in range(5):
        part = slice(2 * i, 2 * i + 2)
        write_cifar_batch(
            directory / f"data_batch_{i + 1}", train_x[part], {b"labels": train_y[part]}
        )
    write_cifar_batch(directory / "test_batch", test_x, {b"labels": test_y})
    return train_x, train_y, test_x, test_y


def as_expected_images(images: np.ndarray) -> torch.Tensor:
    return torch.tensor(images, dtype=torch.float32) / 255


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar10_reads_python_batches_exactly(tmp_path, subfolder):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path / subfolder)
    ds = load_dataset("cifar10", tmp_path)

    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.train_x.dtype == torch.float32
    assert torch.equal(ds.train_x, as_expected_images(train_x))
    assert torch.equal(ds.test_x, as_expected_images(test_x))
    assert ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()


def write_cifar100(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Writes 4 training and 2 test images with fine labels [99, 0, 50, 7] and [5, 6]; returns
    the training and test images."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    train_x, test_x = random_images(rng, 4), random_images(rng, 2)
    train_labels = {b"fine_labels": [99, 0, 50, 7], b"coarse_labels": [1, 2, 3, 4]}
    write_cifar_batch(directory / "train", train_x, train_labels)
    write_cifar_batch(
        directory / "test", test_x, {b"fine_labels": [5, 6], b"coarse_labels": [0, 0]}
    )
    return train_x, test_x


def test_cifar100_reads_fine_labels(tmp_path, monkeypatch):
    train_x, test_x = write_cifar100(tmp_path / "cifar-100-python")
    monkeypatch.setenv("TEKFAC_DATA", str(tmp_path))

    ds = load_dataset("cifar100")
    assert ds.num_classes == 100
    assert torch.equal(ds.train_x, as_expected_images(train_x))
    assert torch.equal(ds.test_x, as_expected_images(test_x))
    assert ds.train_y.tolist() == [99, 0, 50, 7] and ds.test_y.tolist() == [5, 6]


def test_cifar_corrupt_pickle_is_reported(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch") as info:
        load_dataset("cifar10", tmp_path)
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in str(info.value)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_cifar_pickle_cannot_run_code(tmp_path, capsys):
    write_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode()}))
    with pytest.raises(DataError, match=r"refusing to load global builtins\.print"):
        load_dataset("cifar10", tmp_path)
    assert capsys.readouterr().out == ""


def test_cifar_wrong_shape_is_reported(tmp_path):
    write_cifar10(tmp_path)
    bad = {b"data": np.zeros((2, 1024), dtype=np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"shape \(n, 3072\), got uint8 \(2, 1024\)"):
        load_dataset("cifar10", tmp_path)


def test_cifar_label_count_mismatch_is_reported(tmp_path):
    write_cifar10(tmp_path)
    bad = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match="must hold 2 integer labels"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar100")
    assert "no --data-dir given and TEKFAC_DATA is not set" in str(info.value)
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", tmp_path)
    message = str(info.value)
    assert f"{tmp_path} (missing train, test)" in message
    assert f"{tmp_path / 'cifar-100-python'} (no such directory)" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert "cifar-100-python.tar.gz" in message


def test_digits():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1438, 1, 8, 8) and ds.test_x.shape == (359, 1, 8, 8)
    assert ds.train_x.min() == 0 and ds.train_x.max() == 1
    assert ds.train_y.dtype == torch.int64 and set(ds.test_y.tolist()) == set(range(10))
    again = load_dataset("digits")
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)


WRITERS = {"fashion-mnist": write_fashion_mnist, "cifar10": write_cifar10,
           "cifar100": write_cifar100, "fortunes": write_fortunes}


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_input_shapes_are_those_the_loaders_return(tmp_path, name):
    """`INPUT_SHAPES` names every data set; digits is scikit-learn's real data, the others are
    the small files in the real formats that the tests above read."""
    assert set(INPUT_SHAPES) == set(DATASET_NAMES)
    if name in WRITERS:
        WRITERS[name](tmp_path)
    ds = load_dataset(name, tmp_path if name in WRITERS else None)
    assert ds.train_x.shape[1:] == INPUT_SHAPES[name]
    assert ds.test_x.shape[1:] == INPUT_SHAPES[name]


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100, digits"):
        load_dataset("mnist")


def test_split_validation_is_disjoint_complete_and_seeded():
    x = torch.arange(100).view(100, 1)
    y = 2 * torch.arange(100)
    train_x, train_y, val_x, val_y = split_validation(x, y, fraction=0.2, seed=3)

    assert len(val_x) == 20 and len(train_x) == 80
    assert torch.equal(train_y, 2 * train_x[:, 0]) and torch.equal(val_y, 2 * val_x[:, 0])
    assert sorted(train_x[:, 0].tolist() + val_x[:, 0].tolist()) == list(range(100))
    assert torch.equal(val_x, split_validation(x, y, 0.2, seed=3)[2])
    assert not torch.equal(val_x, split_validation(x, y, 0.2, seed=4)[2])
    with pytest.raises(ValueError, match="empty"):
        split_validation(x, y, fraction=0.001, seed=0)


def shifted(image: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    """out[c, i, j] = image[c, i + dy, j' + dx] with j' = W-1-j if flipped, else j; zero where
    that pixel lies outside the image."""
    _, h, w = image.shape
    i = np.arange(h)[:, None] + dy
    j = (np.arange(w)[::-1] if flip else np.arange(w))[None, :] + dx
    inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    return np.where(inside, image[:, i.clip(0, h - 1), j.clip(0, w - 1)], 0)


def test_augment_cifar_shifts_within_padding_with_zero_fill():
    x = torch.arange(1, 16 * 3 * 32 * 32 + 1, dtype=torch.float32).view(16, 3, 32, 32)
    out = augment_cifar(x, torch.Generator().manual_seed(0))

    assert out.shape == x.shape and out.dtype == x.dtype
    found = []
    for image, result in zip(x.numpy(), out.numpy(), strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            for flip in (False, True)
            if np.array_equal(result, shifted(image, dy, dx, flip))
        ]
        assert len(matches) == 1
        found += matches
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in found}) > 1


def test_augment_cifar_flip_only_on_hand_made_image():
    x = torch.tensor([[[[1.0, 2, 3], [4, 5, 6]]]]).repeat(8, 1, 1, 1)
    out = augment_cifar(x, torch.Generator().manual_seed(0), padding=0)
    flipped = torch.tensor([[3.0, 2, 1], [6, 5, 4]])
    is_flipped = [torch.equal(o[0], flipped) for o in out]
    assert all(torch.equal(o[0], x[0, 0]) or f for o, f in zip(out, is_flipped, strict=True))
    assert any(is_flipped) and not all(is_flipped)


def test_augment_cifar_is_deterministic_per_generator():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = augment_cifar(x, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment_cifar(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment_cifar(x, torch.Generator().manual_seed(6)))


@pytest.mark.parametrize(("drop_last", "sizes"), [(True, [4, 4]), (False, [4, 4, 2])])
def test_iterate_minibatches(drop_last, sizes):
    x, y = torch.arange(10), 10 * torch.arange(10)
    batches = list(iterate_minibatches(x, y, 4, torch.Generator().manual_seed(0), drop_last))

    assert [len(bx) for bx, _ in batches] == sizes
    assert all(torch.equal(by, 10 * bx) for bx, by in batches)
    seen = torch.cat([bx for bx, _ in batches]).tolist()
    assert len(set(seen)) == len(seen) and seen != sorted(seen)
    again = list(iterate_minibatches(x, y, 4, torch.Generator().manual_seed(0), drop_last))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_normalize_uses_channel_stats():
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    out = normalize((mean + std).expand(2, 3, 4, 4), "cifar10")
    assert torch.allclose(out, torch.ones(2, 3, 4, 4))
    assert torch.allclose(
        normalize(torch.full((1, 1, 2, 2), 0.2860), "fashion-mnist"), torch.zeros(1)
    )
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        normalize(torch.zeros(1, 1, 4, 4), "cifar10")
