"""The cheap eigenbasis refresh between full eigendecompositions (docs/design.md §4.2): one
step of orthogonal iteration from the previous basis and a QR."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tekfac
from tekfac.linalg import power_iteration_refresh, symmetric_eigh
from tests.conftest import tiny_net


def off_diagonal(matrix: torch.Tensor, basis: torch.Tensor) -> float:
    """``‖offdiag(Uᵀ M U)‖_F / ‖M‖_F``: how far ``basis`` is from diagonalising ``matrix``."""
    rotated = basis.T @ matrix @ basis
    return float((rotated - torch.diag(rotated.diagonal())).norm() / matrix.norm())


def spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=gen, dtype=torch.float64)
    return x.T @ x / (3 * d)


def test_an_exact_basis_stays_exact():
    m = spd(7, 0)
    values, basis = symmetric_eigh(m)
    new_values, new_basis = power_iteration_refresh(m, basis)
    torch.testing.assert_close(new_values.sort().values, values, rtol=1e-10, atol=1e-12)
    assert off_diagonal(m, new_basis) < 1e-12
    torch.testing.assert_close(new_basis.T @ new_basis, torch.eye(7, dtype=torch.float64))


def test_a_stale_basis_moves_towards_the_new_eigenbasis():
    """The factor drifted (an EMA step towards another batch): the refreshed basis
    diagonalises it better than the stale one, and its eigenvalue estimates (Rayleigh
    quotients) are closer to the exact ones."""
    old, new_batch = spd(12, 1), spd(12, 2)
    _, stale = symmetric_eigh(old)
    m = 0.8 * old + 0.2 * new_batch
    exact, _ = symmetric_eigh(m)
    values, refreshed = power_iteration_refresh(m, stale)
    assert off_diagonal(m, refreshed) < 0.8 * off_diagonal(m, stale)
    stale_values = ((m @ stale) * stale).sum(0)
    assert (values.sort().values - exact).norm() < (stale_values.sort().values - exact).norm()


def test_non_finite_factors_are_refused():
    m = spd(4, 3)
    _, basis = symmetric_eigh(m)
    m[0, 0] = float("nan")
    assert power_iteration_refresh(m, basis) is None


def test_the_optimizer_refreshes_between_full_decompositions(method, monkeypatch):
    """``basis_refresh_freq=1``: full eigendecompositions every 4 steps, refreshes on the
    others; training stays finite and a checkpoint resumes bit for bit."""
    calls = []
    real = tekfac.estimates.power_iteration_refresh
    monkeypatch.setattr(tekfac.estimates, "power_iteration_refresh",
                        lambda m, b: calls.append(1) or real(m, b))
    torch.manual_seed(0)
    net, shape = tiny_net("cnn")
    opt = tekfac.KroneckerOptimizer(net, method, cov_update_freq=1, eigen_update_freq=4,
                                    scale_update_freq=1, basis_refresh_freq=1, seed=0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, *shape, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=gen)) for _ in range(8)]

    def run(opt, data):
        for x, y in data:
            out = net(x)
            opt.zero_grad()
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()

    run(opt, batches[:5])
    assert len(calls) == 3 * 2 * 3  # steps 1, 2, 3: 3 layers × 2 sides
    saved = copy.deepcopy((net.state_dict(), opt.state_dict()))
    run(opt, batches[5:])
    after = [p.detach().clone() for p in net.parameters()]
    assert all(p.isfinite().all() for p in after)
    net.load_state_dict(saved[0])
    again = tekfac.KroneckerOptimizer(net, method, cov_update_freq=1, eigen_update_freq=4,
                                      scale_update_freq=1, basis_refresh_freq=1, seed=0)
    again.load_state_dict(saved[1])
    run(again, batches[5:])
    for p, q in zip(net.parameters(), after):
        assert torch.equal(p, q)


def test_basis_refresh_freq_is_validated():
    net, _ = tiny_net("mlp")
    with pytest.raises(ValueError, match="basis_refresh_freq"):
        tekfac.TEKFAC(net, basis_refresh_freq=0)
