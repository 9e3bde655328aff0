"""KL clipping at a reference learning rate (a group's ``kl_clip_lr``, by default its ``lr``
when it was made), with the current rate scaling the clipped step (docs/design.md §4.5): a
schedule acts on the tracked layers even while the clip binds, whether a scheduler or a
hand-written loop sets the rate."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import tekfac
from tests.conftest import tiny_net

FAST = dict(cov_update_freq=1, eigen_update_freq=1, scale_update_freq=1, momentum=0.0,
            fisher="empirical")


def first_step(method: str, factor: float | None, kl_clip: float | None, lr: float = 0.1):
    """The parameter change of one step on a fixed batch; with ``factor``, a scheduler has set
    the rate to ``factor·lr`` (its ``initial_lr`` is ``lr``)."""
    torch.manual_seed(0)
    net, shape = tiny_net("mlp")
    opt = tekfac.KroneckerOptimizer(net, method, lr=lr, kl_clip=kl_clip, **FAST)
    if factor is not None:
        torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: factor)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = torch.randn(8, *shape, dtype=torch.float64), torch.randint(0, 3, (8,))
    F.cross_entropy(net(x), y).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(net.parameters(), before)], opt


def test_a_schedule_scales_the_step_while_the_clip_binds(method):
    peak, peak_opt = first_step(method, None, kl_clip=1e-6)
    half, half_opt = first_step(method, 0.5, kl_clip=1e-6)
    assert float(peak_opt.kl_factor) < 0.1  # the clip binds
    torch.testing.assert_close(half_opt.kl_factor, peak_opt.kl_factor)  # set at the peak rate
    for d_half, d_peak in zip(half, peak):
        torch.testing.assert_close(d_half, 0.5 * d_peak, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("factor", [None, 0.5])
def test_an_inactive_clip_is_no_clip(method, factor):
    loose, opt = first_step(method, factor, kl_clip=1e6)
    free, free_opt = first_step(method, factor, kl_clip=None)
    assert float(opt.kl_factor) == 1.0 and free_opt.kl_factor is None
    for a, b in zip(loose, free):
        assert torch.equal(a, b)


def test_at_the_starting_rate_the_clip_is_ba_et_al(method):
    """At the rate the optimizer was built with, ν = min(1, √(κ / (lr² Σ⟨Δ, ∇⟩)))."""
    for lr in (0.1, 0.4):
        _, opt = first_step(method, None, kl_clip=1e-6, lr=lr)
        pairs = opt.preconditioner.directions()  # the gradients of the step just taken
        q = sum(torch.vdot(g.flatten(), d.flatten()) for g, d in pairs.values()) * lr**2
        torch.testing.assert_close(opt.kl_factor, (1e-6 / q).sqrt(), rtol=1e-10, atol=0)


def tracked_steps(net: torch.nn.Module, opt: tekfac.KroneckerOptimizer,
                  set_rate: Callable[[int], None], steps: int) -> list[torch.Tensor]:
    """Train ``steps`` steps on fixed batches with ``set_rate(s)`` before step ``s``; the
    change of the parameters (concatenated) at every step."""
    gen = torch.Generator().manual_seed(1)
    changes = []
    for s in range(steps):
        set_rate(s)
        x = torch.randn(8, 5, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        before = torch.cat([p.detach().flatten() for p in net.parameters()])
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        assert float(opt.kl_factor) < 0.5  # the clip binds
        changes.append(torch.cat([p.detach().flatten() for p in net.parameters()]) - before)
    return changes


def nanogpt_rate(it: int, lr: float = 0.1, warmup: int = 3, decay_iters: int = 10,
                 min_lr: float = 0.01) -> float:
    """nanoGPT's ``get_lr``: linear warm-up from a small rate, then cosine decay to
    ``min_lr``."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)


def changed_once(it: int) -> float:
    """A rate changed once by hand, from the starting 0.1 to 0.02 at step 2."""
    return 0.1 if it < 2 else 0.02


def run_schedule(method: str, rate: Callable[[int], float] | None, by_hand: bool,
                 steps: int = 12, momentum: float = 0.9) -> list[torch.Tensor]:
    """The parameter changes of ``steps`` steps of the tiny MLP built at lr 0.1 with κ = 1e-5,
    its rate following ``rate`` (``None``: constant) set by hand in the loop (``g["lr"] =
    rate(it)``, as nanoGPT does) or by a ``LambdaLR``."""
    torch.manual_seed(0)
    net, _ = tiny_net("mlp")
    opt = tekfac.KroneckerOptimizer(net, method, lr=0.1, kl_clip=1e-5,
                                    **{**FAST, "momentum": momentum})
    if rate is None:
        def set_rate(it: int) -> None:
            pass
    elif by_hand:
        def set_rate(it: int) -> None:
            for group in opt.param_groups:
                group["lr"] = rate(it)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: rate(it) / 0.1)

        def set_rate(it: int) -> None:
            if it:
                sched.step()
    return tracked_steps(net, opt, set_rate, steps)


@pytest.mark.parametrize("rate", [nanogpt_rate, changed_once], ids=["nanogpt", "changed-once"])
def test_a_rate_set_by_hand_takes_the_steps_of_a_scheduler(method, rate):
    """nanoGPT's loop shape (warm-up from a small rate, cosine decay, written by hand, no
    scheduler) and a rate changed once by hand take the steps of the same schedule given as
    a ``LambdaLR`` (to rounding: the scheduler multiplies ``initial_lr`` by the lambda), and
    not those of a constant rate, with the clip binding at every step. Before ``kl_clip_lr``
    the trust region followed a rate set by hand, so the clipped steps did not."""
    by_hand = run_schedule(method, rate, by_hand=True)
    scheduled = run_schedule(method, rate, by_hand=False)
    constant = run_schedule(method, None, by_hand=True)
    for a, b in zip(by_hand, scheduled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
    ratio = by_hand[-1].norm() / constant[-1].norm()
    assert ratio < 0.5  # the schedule ends at 0.01 or 0.02 of the starting 0.1


def test_steps_at_a_rate_set_by_hand_scale_with_it(method):
    """The issue's measurement: the group ``lr`` multiplied by 1, 0.5 and 0.1 after
    construction (no momentum): the tracked layers' step scales by the same factor (it had
    the same norm for all three while the clip bound)."""
    norms = []
    for factor in (1.0, 0.5, 0.1):
        change, = run_schedule(method, lambda it, f=factor: 0.1 * f, by_hand=True, steps=1,
                               momentum=0.0)
        norms.append(float(change.norm()))
    assert norms[1] / norms[0] == pytest.approx(0.5, rel=1e-10)
    assert norms[2] / norms[0] == pytest.approx(0.1, rel=1e-10)


@pytest.mark.parametrize("where", ["constructor", "group"])
def test_kl_clip_lr_sets_the_reference_rate(method, where):
    """``kl_clip_lr`` (a constructor or group option) is the rate at which κ bounds the step:
    built at lr 0.05 with ``kl_clip_lr=0.1``, the clipped step is half that of an optimizer
    built at 0.1."""
    changes = []
    for lr, reference in ((0.05, 0.1), (0.1, None)):
        torch.manual_seed(0)
        net, _ = tiny_net("mlp")
        options = ({"kl_clip_lr": reference} if where == "constructor" else
                   {"params": [{"params": list(net.parameters()), "kl_clip_lr": reference}]})
        opt = tekfac.KroneckerOptimizer(net, method, lr=lr, kl_clip=1e-6, **FAST, **options)
        assert [group["kl_clip_lr"] for group in opt.param_groups] == [0.1]
        changes += tracked_steps(net, opt, lambda it: None, steps=1)
    torch.testing.assert_close(changes[0], 0.5 * changes[1], rtol=1e-10, atol=1e-15)


def test_the_reference_rate_is_checkpointed_and_old_checkpoints_keep_theirs():
    """``kl_clip_lr`` lives in ``param_groups``, so a checkpoint keeps it; a checkpoint saved
    before it existed takes its scheduler's ``initial_lr``, else its ``lr`` (how its steps
    were clipped then)."""
    net, _ = tiny_net("mlp")
    opt = tekfac.TEKFAC(net, lr=0.1, **FAST)
    for group in opt.param_groups:
        group["lr"] = 0.02
    saved = opt.state_dict()
    fresh = tekfac.TEKFAC(net, lr=0.5, **FAST)
    fresh.load_state_dict(saved)
    assert [(g["lr"], g["kl_clip_lr"]) for g in fresh.param_groups] == [(0.02, 0.1)]
    for old, expected in (({"initial_lr": 0.3}, 0.3), ({}, 0.02)):
        legacy = copy.deepcopy(saved)
        for group in legacy["param_groups"]:
            del group["kl_clip_lr"]
            group.update(old)
        fresh.load_state_dict(legacy)
        assert [g["kl_clip_lr"] for g in fresh.param_groups] == [expected]


@pytest.mark.parametrize("where", ["constructor", "group"])
def test_an_invalid_kl_clip_lr_is_refused(where):
    net, _ = tiny_net("mlp")
    options = ({"kl_clip_lr": -0.1} if where == "constructor" else
               {"params": [{"params": list(net.parameters()), "kl_clip_lr": -1.0}]})
    with pytest.raises(ValueError, match="kl_clip_lr"):
        tekfac.TEKFAC(net, **options)
