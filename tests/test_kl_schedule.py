"""KL clipping at the peak learning rate, with the schedule scaling the clipped step
(docs/design.md §4.5): a schedule acts on the tracked layers even while the clip binds."""

from __future__ import annotations

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


def test_without_a_scheduler_the_clip_is_ba_et_al(method):
    """No ``initial_lr``: ν = min(1, √(κ / (lr² Σ⟨Δ, ∇⟩))) with the current rate, whatever it
    is (a rate set by hand is the peak)."""
    for lr in (0.1, 0.4):
        _, opt = first_step(method, None, kl_clip=1e-6, lr=lr)
        pairs = opt.preconditioner.directions()  # the gradients of the step just taken
        q = sum(torch.vdot(g.flatten(), d.flatten()) for g, d in pairs.values()) * lr**2
        torch.testing.assert_close(opt.kl_factor, (1e-6 / q).sqrt(), rtol=1e-10, atol=0)
