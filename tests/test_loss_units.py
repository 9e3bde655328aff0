"""The curvature in the loss's units (docs/design.md §3, issue #32): the preconditioner uses
``c·F̂``, the curvature of the loss as the user reduced it, so that the damping, the learning
rate and κ mean the same whatever the loss's reduction and output width."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac

N, K = 8, 6  # examples, outputs (pixels) per example


def autoencoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, 4), nn.ReLU(), nn.Linear(4, 3), nn.Linear(3, 4),
                         nn.ReLU(), nn.Linear(4, K)).double()


def steps(method: str, fisher: str, reduction: str, damping_type: str, scale: float,
          count: int = 5) -> list[torch.Tensor]:
    """The parameters after each of ``count`` steps of a tiny autoencoder trained on the
    per-pixel binary cross-entropy reduced by ``reduction``, with the damping (γ of
    ``trace_relative`` excepted: it is relative to the curvature), the damping floor and κ
    multiplied by ``scale``, the learning rate not."""
    net = autoencoder()
    relative = damping_type == "trace_relative"
    opt = tekfac.KroneckerOptimizer(
        net, method, lr=0.1, momentum=0.9, damping=1e-2 * (1.0 if relative else scale),
        damping_floor=1e-2 * scale,
        damping_type=damping_type, kl_clip=1e-3 * scale, fisher=fisher,
        loss="bce_with_logits", reduction=reduction, cov_update_freq=1, eigen_update_freq=2,
        scale_update_freq=1, seed=3)
    gen = torch.Generator().manual_seed(1)
    trajectory = []
    for _ in range(count):
        x = torch.rand(N, K, dtype=torch.float64, generator=gen)
        out = net(x)
        loss = F.binary_cross_entropy_with_logits(out, x, reduction=reduction)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
        trajectory.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    return trajectory


DAMPINGS = {"kfac": ["eigenvalue", "pi", "trace_relative"], "tkfac": ["pi"],
            "ekfac": ["eigenvalue", "trace_relative"], "tekfac": ["eigenvalue"]}


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize(("method", "damping_type"),
                         [(m, d) for m, kinds in DAMPINGS.items() for d in kinds])
def test_a_summed_loss_takes_the_steps_of_its_mean_with_damping_scaled_alike(
        method, damping_type, fisher):
    """The summed loss is ``s = N·K`` times the mean over examples and pixels: its gradient
    and its curvature are ``s`` times larger, so with the damping (and its floor) and κ
    multiplied by ``s`` and the same learning rate it takes the same steps, as a Newton step
    on either loss would. With the per-example Fisher of §1 as the curvature (before issue
    #32) the two differed by ``K`` in the curvature's units: the same values meant a damping
    ``K²`` times weaker on a 784-pixel output than on a 10-class head."""
    mean = steps(method, fisher, "mean", damping_type, 1.0)
    summed = steps(method, fisher, "sum", damping_type, float(N * K))
    for a, b in zip(mean, summed):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert (mean[-1] - mean[0]).norm() > 1e-2  # the steps moved the parameters


def test_the_curvature_is_the_losss_gauss_newton_matrix():
    """For one example the curvature of the output layer, ``c·G ⊗ A`` with ``c = K``, is
    the Gauss–Newton matrix ``Jᵀ H J`` of the mean loss (``H = diag(σ(1-σ))/K`` for the
    per-pixel BCE averaged over ``K`` pixels), computed from the exact expectation over the
    MC labels through the empirical Fisher of every label vector."""
    net = autoencoder()
    x = torch.rand(1, K, dtype=torch.float64)
    head = net[-1]
    with torch.no_grad():
        hidden = net[:-1](x)
        p = torch.sigmoid(net(x))[0]
    a = torch.cat([hidden[0], torch.ones(1, dtype=x.dtype)])
    exact = torch.kron(torch.diag(p * (1 - p)) / K, torch.outer(a, a))
    pre = tekfac.Preconditioner(net, "kfac", fisher="empirical", loss="bce_with_logits",
                                cov_update_freq=1, eigen_update_freq=1, stat_decay=0.0)
    # E_y over y ~ Bernoulli(p) of the empirical statistics: Σ over the 2^K label vectors
    expected = torch.zeros_like(exact)
    for code in range(2**K):
        y = torch.tensor([(code >> i) & 1 for i in range(K)], dtype=x.dtype)
        weight = torch.prod(torch.where(y > 0, p, 1 - p))
        out = net(x)
        net.zero_grad()
        pre.backward(F.binary_cross_entropy_with_logits(out, y[None]), out)
        pre.update_curvature()
        expected += weight * pre.curvature(head).dense()
    torch.testing.assert_close(expected, exact, rtol=1e-10, atol=1e-12)
