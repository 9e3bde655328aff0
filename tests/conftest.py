"""Shared fixtures: tiny float64 networks and batches for exact-algebra tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import tekfac.fisher
from tekfac import METHODS


class MeanOverSequence(nn.Module):
    """Average over dim 1 (the sequence) of a ``(N, L, d)`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class Tokens(nn.Module):
    """Real inputs to token indices in ``[0, vocab)`` (so that the exact-algebra tests can feed
    an embedding the same random batches as the other networks)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).floor().long().remainder(self.vocab)


def tiny_net(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A tiny float64 network and the shape of one input example."""
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        shape = (5,)
    elif kind == "cnn":  # stride, padding, 'same' with dilation, no bias
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(3, 2, 2, padding="same", dilation=2, bias=False), nn.Tanh(),
            nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        shape = (2, 5, 5)
    elif kind == "conv1d":
        net = nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=2), nn.Tanh(),
                            nn.Conv1d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(2 * 3, 3))
        shape = (2, 7)
    elif kind == "sequence":  # Linear with a leading sequence dimension
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), MeanOverSequence(), nn.Linear(4, 3))
        shape = (4, 3)
    elif kind == "embedding":  # token 0 is padding: no gradient, no statistics
        net = nn.Sequential(Tokens(6), nn.Embedding(6, 4, padding_idx=0), nn.Tanh(),
                            MeanOverSequence(), nn.Linear(4, 3))
        shape = (5,)
    elif kind == "hf-conv1d":  # Hugging Face's Conv1D (GPT-2's projections), W of (d_in, d_out)
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        net = nn.Sequential(conv1d(4, 3), nn.Tanh(), MeanOverSequence(), conv1d(3, 4))
        shape = (4, 3)
    else:
        raise ValueError(kind)
    return net.double(), shape


NETS = ["mlp", "cnn", "conv1d", "sequence", "embedding", "hf-conv1d"]


def batch(shape: tuple[int, ...], n: int = 8, dtype: torch.dtype = torch.float64):
    """Random inputs of ``shape`` per example and labels in {0, 1, 2}."""
    return torch.randn(n, *shape, dtype=dtype), torch.randint(0, 3, (n,))


def train(model: nn.Module, opt, batches, mc: bool = True) -> None:
    """One optimizer step per ``(x, y)`` with cross-entropy; the sampled backward if ``mc``."""
    for x, y in batches:
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        if mc:
            opt.backward(loss, out)
        else:
            loss.backward()
        opt.step()


def curvature_of(state_dict: dict) -> dict:
    """The curvature part of an optimizer's state dict (format 3: in ``param_groups[0]``)."""
    return state_dict["param_groups"][0]["tekfac"]["curvature"]


def set_fields(entry: dict) -> set[str]:
    """The fields of a layer's checkpoint entry that are set (its ``"set"`` flags)."""
    names = [key for key in entry if key != "set"]
    return {name for name, flag in zip(names, entry["set"].tolist()) if flag}


def argmax_labels(loss: str, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A deterministic stand-in for the MC label sampler ``tekfac.fisher.sample_targets``, so
    that two runs that split the same examples differently (micro-batches, ranks, which draw
    different labels by design) have comparable MC statistics."""
    return outputs.detach().argmax(1)


def counting_argmax_labels(calls: list) -> Callable[..., torch.Tensor]:
    """:func:`argmax_labels` that appends to ``calls`` each time it is used, so that a test
    can assert that its patch of the sampler still applies."""
    def sampler(loss: str, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(loss)
        return argmax_labels(loss, outputs, generator)

    return sampler


@pytest.fixture
def argmax_sampler(monkeypatch) -> list:
    """Replace the MC label sampler ``tekfac.fisher.sample_targets`` (the one name the sampled
    backward draws labels through) by :func:`argmax_labels`; returns the list of its calls,
    which a test using the MC Fisher asserts to be non-empty."""
    calls: list = []
    monkeypatch.setattr(tekfac.fisher, "sample_targets", counting_argmax_labels(calls))
    return calls


@pytest.fixture(params=list(METHODS))
def method(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
