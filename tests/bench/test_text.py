"""The text-gpt task: the fortunes loader, the tiny GPT, training through the benchmark runner
with every optimizer, and the bits-per-character metric."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tekfac.bench import data as data_module
from tekfac.bench.data import (
    CHARACTERS,
    DEFAULT_FORTUNES_DIR,
    FORTUNES_FILES,
    INPUT_SHAPES,
    UNKNOWN,
    DataError,
    decode,
    encode,
    join_fortunes,
    load_dataset,
    read_fortune_file,
    split_fortunes,
    text_windows,
)
from tekfac.bench.models import MODELS, tiny_gpt
from tekfac.bench.optimizers import DEFAULT_HPARAMS, OPTIMIZERS
from tekfac.bench.runner import Split, run
from tekfac.bench.tasks import TASKS

TASK = TASKS["text-gpt"]
(T,) = INPUT_SHAPES["fortunes"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: a transformer step is hundreds of small ops, and on a busy shared
    machine each one waits for a descheduled second thread (measured: 10x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fortunes(file: int) -> list[str]:
    """The fortunes written to the ``file``-th fortune file: distinct texts, some of several
    lines, long enough that the test part holds a window."""
    return [f"Fortune {file}.{i}: the quick brown fox jumps over the lazy dog\n\t\t-- no. {i}"
            for i in range(3)]


def write_fortunes(folder: Path) -> Path:
    """A tiny corpus in the real on-disk format: every file of `FORTUNES_FILES`, its fortunes
    separated by lines holding ``%`` alone, plus the package's ``.dat`` index and ``.u8`` link
    that the loader must ignore. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(FORTUNES_FILES):
        (folder / name).write_text("\n%\n".join(tiny_fortunes(k)) + "\n%\n")
        (folder / f"{name}.dat").write_bytes(b"\x00\x00\x00\x02\xff\xfe binary index")
        (folder / f"{name}.u8").symlink_to(name)
    return folder


def test_read_fortune_file_splits_on_percent_lines_and_cleans(tmp_path):
    path = tmp_path / "cookie"
    path.write_bytes(b"first\nline two\n%\n%\n\n_\b_\bAB\bB and a bell\a\n%\n"
                     b"last, no newline\n%")
    assert read_fortune_file(path) == ["first\nline two", "AB and a bell", "last, no newline"]
    path.write_bytes(b"\xff\xfe not utf-8\n%\n")
    with pytest.raises(DataError, match="UTF-8"):
        read_fortune_file(path)


def test_split_is_every_tenth_fortune_without_repeats():
    fortunes = [f"f{i}" for i in range(25)]
    train, test = split_fortunes([*fortunes[:12], "f3", *fortunes[12:]])  # f3 repeated
    assert test == ["f9", "f19"]
    assert train == [f for f in fortunes if f not in test]
    assert split_fortunes(fortunes) == (train, test)  # the repeat changed nothing


def test_vocabulary_and_encoding():
    assert CHARACTERS[0] == UNKNOWN and len(CHARACTERS) == len(set(CHARACTERS)) == 98
    assert list(CHARACTERS[1:]) == sorted(CHARACTERS[1:])
    assert set(CHARACTERS[1:]) == {"\t", "\n"} | {chr(c) for c in range(32, 127)}
    tokens = encode("Hi\tthere!\nnaïve ☃ ~")
    assert tokens.dtype == torch.int64 and tokens.shape == (19,)
    assert decode(tokens) == f"Hi\tthere!\nna{UNKNOWN}ve {UNKNOWN} ~"
    assert tokens[12] == 0 and tokens[16] == 0 and tokens.max() < len(CHARACTERS)


def test_text_windows_are_consecutive_and_shifted_by_one():
    x, y = text_windows(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, y = text_windows(torch.arange(3), 3)
    assert x.shape == y.shape == (0, 3)


def test_loader_reads_a_corpus_in_the_real_format(tmp_path):
    write_fortunes(tmp_path / "fortunes")
    ds = load_dataset("fortunes", tmp_path)  # the standard subfolder of --data-dir
    assert ds.name == "fortunes" and ds.vocab == CHARACTERS and ds.num_classes == 98
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1:] == (T,)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])
    fortunes = [f for k in range(len(FORTUNES_FILES)) for f in tiny_fortunes(k)]  # in order
    test = encode(join_fortunes(fortunes[9::10]))  # the 10th, 20th, ... fortunes
    assert torch.equal(ds.test_x.flatten(), test[: ds.test_x.numel()])
    assert len(ds.test_x) == (len(test) - 1) // T
    train = join_fortunes(fortunes[:9] + fortunes[10:19])
    assert decode(ds.train_x.flatten()).startswith(train[: 3 * T])
    assert (ds.train_x == 0).sum() == 0  # the tiny corpus is all in the vocabulary
    again = load_dataset("fortunes", tmp_path / "fortunes")  # the folder itself
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_loader_honours_the_environment_variable(tmp_path, monkeypatch):
    write_fortunes(tmp_path / "fortunes")
    monkeypatch.setenv("TEKFAC_DATA", str(tmp_path))
    assert load_dataset("fortunes").train_x.shape[1:] == (T,)


def test_missing_corpus_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv("TEKFAC_DATA", raising=False)
    with pytest.raises(DataError) as info:
        load_dataset("fortunes", tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get install -y fortunes" in message and "--data-dir" in message
    assert "no such directory" in message
    monkeypatch.setattr(data_module, "DEFAULT_FORTUNES_DIR", tmp_path / "not-installed")
    with pytest.raises(DataError, match="apt-get install -y fortunes"):
        load_dataset("fortunes")


def test_partial_corpus_lists_the_missing_files(tmp_path):
    write_fortunes(tmp_path)
    (tmp_path / "zippy").unlink()
    with pytest.raises(DataError, match=r"missing zippy\)"):
        load_dataset("fortunes", tmp_path)


def test_too_short_corpus_is_an_error(tmp_path):
    for name in FORTUNES_FILES:
        (tmp_path / name).write_text("short\n%\n")
    with pytest.raises(DataError, match="less than one window"):
        load_dataset("fortunes", tmp_path)


@pytest.mark.skipif(not (DEFAULT_FORTUNES_DIR / "cookie").is_file(),
                    reason="Debian package fortunes not installed")
def test_real_corpus(monkeypatch):
    monkeypatch.delenv("TEKFAC_DATA", raising=False)
    ds = load_dataset("fortunes")
    assert 30_000 < len(ds.train_x) < 40_000 and 3_000 < len(ds.test_x) < 5_000
    assert (ds.train_x == 0).float().mean() < 1e-4  # almost nothing is outside the vocabulary
    text = decode(ds.train_x[:200].flatten())
    assert "\n%\n" in text and " the " in text


def test_tiny_gpt_shapes_tying_and_causality():
    torch.manual_seed(0)
    model = tiny_gpt(vocab_size=11, block_size=8, width=16, depth=2, heads=4)
    assert MODELS["tiny_gpt"] is tiny_gpt
    assert model.head.weight is model.tok.weight and model.head.bias is None
    assert sum(isinstance(m, nn.MultiheadAttention) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 5
    tokens = torch.randint(0, 11, (3, 8))
    logits = model(tokens)
    assert logits.shape == (3, 8, 11)
    assert model(tokens[:, :5]).shape == (3, 5, 11)
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11  # the future does not change the past
    assert torch.allclose(model(changed)[:, :5], logits[:, :5], atol=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.int64))
    default = tiny_gpt()
    assert default.tok.num_embeddings == len(CHARACTERS) and default.pos.num_embeddings == T
    assert sum(p.numel() for p in default.parameters()) == 110_464


def test_task_outputs_are_the_flattened_logits_the_loss_takes():
    torch.manual_seed(0)
    model = TASK.build()
    x = torch.randint(0, len(CHARACTERS), (2, T))
    y = torch.randint(0, len(CHARACTERS), (2, T))
    outputs = TASK.forward(model, TASK.inputs(x))
    targets = TASK.targets(x, y)
    assert outputs.shape == (2 * T, len(CHARACTERS)) and targets.shape == (2 * T,)
    assert torch.equal(outputs.view(2, T, -1), model(x))
    assert torch.equal(targets.view(2, T), y)
    expected = nn.functional.cross_entropy(model(x).transpose(1, 2), y)  # (N, V, T) layout
    assert torch.allclose(TASK.loss_fn(outputs, targets), expected)
    assert TASK.loss == "cross_entropy" and not TASK.higher_is_better


class Uniform(nn.Module):
    """Equal logits for every token: log2(V) bits per character."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.vocab_size)


class Oracle(nn.Module):
    """Probability 1/2 on the true next token of a fixed stream (``next_of``), the rest
    spread evenly."""

    def __init__(self, next_of: dict[int, int], vocab_size: int) -> None:
        super().__init__()
        self.next_of, self.vocab_size = next_of, vocab_size
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.vocab_size
        logits = torch.zeros(*tokens.shape, v)
        nxt = torch.tensor([self.next_of[t] for t in tokens.flatten().tolist()])
        logits.view(-1, v)[torch.arange(nxt.numel()), nxt] = math.log(v - 1)
        return logits


def test_bits_per_character_on_known_cases():
    v = len(CHARACTERS)
    x = torch.randint(0, v, (7, T))
    y = torch.randint(0, v, (7, T))
    assert TASK.evaluate(Uniform(v), x, y, batch_size=3) == pytest.approx(math.log2(v), rel=1e-6)
    stream = torch.randperm(v)  # distinct tokens: each has one successor
    x, y = text_windows(stream, 8)
    oracle = Oracle(dict(zip(stream[:-1].tolist(), stream[1:].tolist(), strict=True)), v)
    assert TASK.evaluate(oracle, x, y, batch_size=5) == pytest.approx(1.0, rel=1e-6)


def fake_split(n_train: int = 16, n_eval: int = 4) -> Split:
    """Windows of a repetitive token stream (learnable), in the data set's layout."""
    stream = encode("the cat sat on the mat. " * ((n_train + n_eval) * T // 24 + 2))
    x, y = text_windows(stream, T)
    return Split(x[:n_train], y[:n_train], x[n_train:n_train + n_eval],
                 y[n_train:n_train + n_eval])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_the_task_through_the_runner(optimizer):
    records = run(TASK, fake_split(), optimizer, DEFAULT_HPARAMS[optimizer], seed=0, epochs=3,
                  batch_size=4, quiet=True)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert not any(r["diverged"] for r in records)
    assert all(math.isfinite(r["train_loss"]) for r in records[1:])
    assert all(0 < r["test_metric"] < 10 for r in records)
    assert records[0]["test_metric"] == pytest.approx(math.log2(len(CHARACTERS)), abs=0.2)
    assert records[-1]["train_loss"] < records[1]["train_loss"]


def test_tekfac_tracks_the_mlp_and_head_layers():
    """The MLP and head layers get Kronecker blocks, and a statistics-and-eigenbasis step with
    the flattened logits given to backward leaves the parameters finite, with no fault."""
    import tekfac

    torch.manual_seed(0)
    model = TASK.build()
    opt = tekfac.KroneckerOptimizer(model, "tekfac", lr=0.01, damping=0.1,
                                    loss="cross_entropy", cov_update_freq=1,
                                    eigen_update_freq=1)
    described = opt.describe()
    for name in ("blocks.0.fc1", "blocks.1.fc2", "head"):
        assert any(line.startswith(name) and "TEKFAC" in line
                   for line in described.splitlines()), name
    split = fake_split(8, 0)
    x, y = split.train_x[:4], split.train_y[:4]
    outputs = TASK.forward(model, TASK.inputs(x))
    loss = TASK.loss_fn(outputs, TASK.targets(x, y))
    opt.zero_grad()
    opt.backward(loss, outputs)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not opt.faults
