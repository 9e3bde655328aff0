"""Faults that skip a whole step: non-finite model outputs (hence loss) on any step, with
either Fisher and every MC sampler (categorical, Gaussian, Bernoulli), NaN and ±Inf, in one
example or the whole batch, and in one micro-batch of an accumulated step. The step must not
raise; afterwards parameters, momentum, curvature state and step counter are exactly those
of a run that never saw the bad batch, which the next batches then follow bit for bit (the
MC labels are a function of the step counter). Each fault is warned about once, with its
step, and counted in the optimizer's checkpointed ``faults``."""

from __future__ import annotations

import copy
import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
from tests.conftest import curvature_of

FAST = dict(cov_update_freq=2, eigen_update_freq=3, scale_update_freq=2)
LOSSES = ("cross_entropy", "mse", "bce_with_logits")
VALUES = (float("nan"), float("inf"), float("-inf"))
SCOPES = ("one example", "whole batch")
CAUSE = ("model", "non-finite model outputs or loss")


def loss_of(loss: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, y)
    if loss == "mse":
        return F.mse_loss(outputs, F.one_hot(y, 3).double())
    return F.binary_cross_entropy_with_logits(outputs, F.one_hot(y, 3).double())


class Poison:
    """A forward hook on the output layer that writes ``value`` into its output (one example
    or all) while ``on``."""

    def __init__(self, value: float, scope: str):
        self.value, self.scope, self.on = value, scope, False

    def __call__(self, module, args, output):
        if not self.on:
            return output
        output = output.clone()
        output[0 if self.scope == "one example" else slice(None)] = self.value
        return output


def train(method: str, fisher: str, loss: str, poison: Poison | None, bad: set[int],
          steps: int = 6, micro: int = 1):
    """Train on ``steps`` batches; the batches in ``bad`` are poisoned (in the last of
    ``micro`` micro-batches) when ``poison`` is given, else left out."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if poison is not None:
        net[2].register_forward_hook(poison)
    opt = tekfac.KroneckerOptimizer(net, method, fisher=fisher, loss=loss, seed=1, lr=0.05,
                                    **FAST)
    gen = torch.Generator().manual_seed(2)
    for i in range(steps):
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=gen)
        if i in bad and poison is None:
            continue
        opt.zero_grad()
        for k, part in enumerate(torch.arange(6).chunk(micro)):
            if poison is not None:
                poison.on = i in bad and k == micro - 1
            out = net(x[part])
            opt.backward(loss_of(loss, out, y[part]) * len(part) / 6, out)
        opt.step()
    if poison is not None:
        poison.on = False
    return net, opt


def assert_same_run(a, b) -> None:
    (net_a, opt_a), (net_b, opt_b) = a, b
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    assert curvature_of(state_a)["steps"] == curvature_of(state_b)["steps"]
    for name, layer in curvature_of(state_a)["layers"].items():
        assert layer.keys() == curvature_of(state_b)["layers"][name].keys()
        for key, value in layer.items():
            assert torch.equal(value, curvature_of(state_b)["layers"][name][key]), (name, key)
    for key, value in state_a["state"].items():
        assert torch.equal(value["momentum_buffer"], state_b["state"][key]["momentum_buffer"])


def pairwise():
    """Loss × value × scope, each with a method and a Fisher kind taken in turn (so that
    every pair of methods and Fisher kinds, and of each with every loss, occurs)."""
    methods, fishers = list(tekfac.METHODS), ["mc", "empirical"]
    for i, (loss, value, scope) in enumerate(itertools.product(LOSSES, VALUES, SCOPES)):
        yield methods[i % 4], fishers[(i // 4 + i) % 2], loss, value, scope


@pytest.mark.parametrize(("method", "fisher", "loss", "value", "scope"), list(pairwise()))
def test_non_finite_outputs_skip_the_step_as_if_the_batch_was_never_seen(
        method, fisher, loss, value, scope):
    clean = train(method, fisher, loss, None, bad={2})
    poison = Poison(value, scope)
    with pytest.warns(RuntimeWarning, match=r"non-finite model outputs or loss; skipping"):
        poisoned = train(method, fisher, loss, poison, bad={2})
    assert_same_run(poisoned, clean)
    assert poisoned[1].faults[CAUSE] == {"first_step": 2, "count": 1}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "fisher", "loss", "value", "scope"), list(itertools.product(
    tekfac.METHODS, ["mc", "empirical"], LOSSES, VALUES, SCOPES)))
def test_non_finite_outputs_full_product(method, fisher, loss, value, scope):
    test_non_finite_outputs_skip_the_step_as_if_the_batch_was_never_seen(
        method, fisher, loss, value, scope)


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_one_bad_micro_batch_skips_the_accumulated_step(fisher, method):
    clean = train(method, fisher, "cross_entropy", None, bad={3}, micro=2)
    with pytest.warns(RuntimeWarning, match="non-finite model outputs"):
        poisoned = train(method, fisher, "cross_entropy", Poison(float("nan"), "whole batch"),
                         bad={3}, micro=2)
    assert_same_run(poisoned, clean)


def test_faults_are_warned_once_counted_and_checkpointed():
    poison = Poison(float("nan"), "one example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, opt = train("tekfac", "mc", "cross_entropy", poison, bad={1, 4})
    messages = [str(w.message) for w in caught if "tekfac" in str(w.message)]
    assert len(messages) == 1 and "(step 1;" in messages[0]
    assert opt.faults[CAUSE] == {"first_step": 1, "count": 2}
    saved = copy.deepcopy(opt.state_dict())
    assert {"place": "model", "cause": CAUSE[1], "first_step": 1,
            "count": 2} in json.loads(curvature_of(saved)["faults"])
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    resumed = tekfac.TEKFAC(net, **FAST)
    resumed.load_state_dict(saved)
    assert resumed.faults == opt.faults
