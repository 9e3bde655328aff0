"""Rank-k eigenbases with an isotropic remainder (tekfac.truncation) against dense algebra:
each truncated basis is completed to a square orthonormal ``Q`` (its complement from a QR), the
extended grid expanded to a full diagonal, and ``F̂ = Q diag Qᵀ`` built densely."""

from __future__ import annotations

import pytest
import torch

from tekfac.truncation import (
    carry_weights,
    merge,
    rank_one_square_sums,
    scale,
    sizes,
    split,
    square_sums,
    truncate,
    truncated,
)

F64 = torch.float64
D_OUT, D_IN = 5, 7


def psd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, d + 2, generator=g, dtype=torch.float64)
    return x @ x.T


def completed(basis: torch.Tensor | None, d: int) -> torch.Tensor:
    """A square orthonormal matrix whose first columns are ``basis`` (the identity for None)."""
    if basis is None:
        return torch.eye(d, dtype=F64)
    if not truncated(basis):
        return basis
    g = torch.Generator().manual_seed(99)
    q, _ = torch.linalg.qr(torch.cat([basis, torch.randn(d, d, generator=g, dtype=F64)], 1))
    q = q[:, :d].contiguous().clone()
    q[:, :basis.shape[1]] = basis  # QR gives these up to signs
    return q


def expanded(grid: torch.Tensor, basis_out, basis_in) -> torch.Tensor:
    """The extended grid as a full ``(d_out, d_in)`` diagonal (remainder values repeated)."""
    rows = sizes(basis_out, D_OUT).long()
    cols = sizes(basis_in, D_IN).long()
    return grid.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


def dense(grid, basis_out, basis_in) -> torch.Tensor:
    q = torch.kron(completed(basis_out, D_OUT), completed(basis_in, D_IN))
    return (q * expanded(grid, basis_out, basis_in).reshape(-1)) @ q.T


def block_averages(f: torch.Tensor, basis_out, basis_in) -> torch.Tensor:
    """The diagonal of ``f`` in the completed bases, averaged over each piece of the grid."""
    q = torch.kron(completed(basis_out, D_OUT), completed(basis_in, D_IN))
    diag = (q.T @ f @ q).diagonal().reshape(D_OUT, D_IN)
    rows = sizes(basis_out, D_OUT).long().tolist()
    cols = sizes(basis_in, D_IN).long().tolist()
    per_row = torch.stack([r.mean(0) for r in torch.split(diag, rows, 0)])
    return torch.stack([c.mean(1) for c in torch.split(per_row, cols, 1)], 1)


def side(kind: str, d: int, seed: int) -> torch.Tensor | None:
    if kind == "diagonal":
        return None
    values, vectors = torch.linalg.eigh(psd(d, seed))
    return truncate(values, vectors.contiguous(), d if kind == "full" else 2)[1]


def grid_for(basis_out, basis_in, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (len(sizes(basis_out, D_OUT)), len(sizes(basis_in, D_IN)))
    return torch.rand(shape, generator=g, dtype=F64) + 0.1


KINDS = [("truncated", "truncated"), ("truncated", "full"), ("full", "truncated"),
         ("diagonal", "truncated"), ("truncated", "diagonal"), ("full", "full")]


def test_truncate_keeps_the_largest_pairs_and_the_trace():
    x = psd(D_IN, 0)
    values, vectors = torch.linalg.eigh(x)
    ext, basis = truncate(values, vectors, 3)
    assert basis.shape == (D_IN, 3) and ext.shape == (4,)
    assert torch.allclose(ext[:3], values.flip(0)[:3])
    assert torch.allclose(basis.T @ x @ basis, torch.diag(ext[:3]), atol=1e-10)
    assert torch.allclose((ext * sizes(basis, D_IN)).sum(), x.trace())


@pytest.mark.parametrize(("out_kind", "in_kind"), KINDS)
def test_split_and_merge_are_inverse_and_piecewise_scaling_is_the_dense_solve(out_kind, in_kind):
    u_out, u_in = side(out_kind, D_OUT, 1), side(in_kind, D_IN, 2)
    m = torch.randn(D_OUT, D_IN, dtype=F64)
    pieces = split(m, u_out, u_in)
    assert torch.allclose(merge(pieces, u_out, u_in), m, atol=1e-12)
    grid = grid_for(u_out, u_in)
    k_out = u_out.shape[1] if u_out is not None else D_OUT
    k_in = u_in.shape[1] if u_in is not None else D_IN
    f = dense(grid, u_out, u_in)
    solved = merge(scale(pieces, grid, k_out, k_in, divide=True), u_out, u_in)
    assert torch.allclose(solved.reshape(-1), torch.linalg.solve(f, m.reshape(-1)), atol=1e-10)
    applied = merge(scale(pieces, grid, k_out, k_in, divide=False), u_out, u_in)
    assert torch.allclose(applied.reshape(-1), f @ m.reshape(-1), atol=1e-10)
    v = m.reshape(-1)
    assert torch.allclose((square_sums(pieces, k_out, k_in) * grid).sum(), v @ f @ v)


@pytest.mark.parametrize(("out_kind", "in_kind"), KINDS)
def test_block_averages_of_per_example_second_moments_fit_the_trace(out_kind, in_kind):
    """The corrected scaling on the grid: mean square sums per piece over the piece's size;
    its kept entries are ``diag(Qᵀ F Q)``, each remainder the mean of its piece's diagonal, and
    ``Σ size·S = tr F``."""
    u_out, u_in = side(out_kind, D_OUT, 1), side(in_kind, D_IN, 2)
    k_out = u_out.shape[1] if u_out is not None else D_OUT
    k_in = u_in.shape[1] if u_in is not None else D_IN
    d = torch.randn(9, D_OUT, D_IN, dtype=F64)
    estimate = sum(square_sums(split(x, u_out, u_in), k_out, k_in) for x in d) / len(d)
    size = sizes(u_out, D_OUT)[:, None] * sizes(u_in, D_IN)[None, :]
    grid = estimate / size
    f = torch.einsum("np,nq->pq", d.reshape(9, -1), d.reshape(9, -1)) / 9
    assert torch.allclose(grid, block_averages(f, u_out, u_in), atol=1e-10)
    assert torch.allclose((grid * size).sum(), f.trace())
    g, a = torch.randn(9, D_OUT, dtype=F64), torch.randn(9, D_IN, dtype=F64)
    rank_one = torch.einsum("no,ni->noi", g, a)
    assert torch.allclose(rank_one_square_sums(g, a, u_out, u_in),
                          sum(square_sums(split(x, u_out, u_in), k_out, k_in) for x in rank_one))


@pytest.mark.parametrize("old_kind", ["truncated", "full"])
@pytest.mark.parametrize("new_kind", ["truncated", "full"])
def test_carry_gives_the_block_averages_of_the_old_diagonal_in_the_new_basis(old_kind, new_kind):
    old_out, old_in = side(old_kind, D_OUT, 1), side(old_kind, D_IN, 2)
    new_out, new_in = side(new_kind, D_OUT, 3), side(new_kind, D_IN, 4)
    grid = grid_for(old_out, old_in)
    carried = carry_weights(new_out, old_out, D_OUT) @ grid @ carry_weights(
        new_in, old_in, D_IN).T
    f = dense(grid, old_out, old_in)
    assert torch.allclose(carried, block_averages(f, new_out, new_in), atol=1e-10)
    size_new = sizes(new_out, D_OUT)[:, None] * sizes(new_in, D_IN)[None, :]
    assert torch.allclose((carried * size_new).sum(), f.trace())


def test_kronecker_grid_of_truncated_factors_is_their_kronecker_product():
    """KFAC with both sides truncated: ``S = λ_out,ext λ_in,extᵀ`` is ``Ĝ ⊗ Â`` with
    ``Â = U Λ Uᵀ + ρ (I - U Uᵀ)``."""
    a, g = psd(D_IN, 5), psd(D_OUT, 6)
    lam_in, u_in = truncate(*torch.linalg.eigh(a), 3)
    lam_out, u_out = truncate(*torch.linalg.eigh(g), 2)
    grid = lam_out[:, None] * lam_in[None, :]

    def approx(lam, u, d):
        p = u @ u.T
        return u @ torch.diag(lam[:-1]) @ u.T + lam[-1] * (torch.eye(d, dtype=F64) - p)

    expected = torch.kron(approx(lam_out, u_out, D_OUT), approx(lam_in, u_in, D_IN))
    assert torch.allclose(dense(grid, u_out, u_in), expected, atol=1e-10)


# ---------------------------------------------------------------- in the optimizer
@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac"])
@pytest.mark.parametrize("damping_type", ["eigenvalue", "trace_relative"])
def test_truncated_blocks_precondition_as_their_dense_form(method, damping_type):
    import tekfac
    from tests.conftest import batch, tiny_net, train

    torch.manual_seed(0)
    net, shape = tiny_net("mlp")
    opt = tekfac.KroneckerOptimizer(net, method, basis_rank=2, cov_update_freq=1,
                                    eigen_update_freq=2, damping_type=damping_type)
    train(net, opt, [batch(shape) for _ in range(5)])
    for layer in opt.preconditioner.layers:
        curv = opt.curvature(layer.module)
        m = torch.randn(layer.d_out, layer.d_in, dtype=F64)
        f = curv.dense(damped=True)
        assert torch.allclose(curv.precondition(m).reshape(-1),
                              torch.linalg.solve(f, m.reshape(-1)), atol=1e-8)
        assert torch.allclose(curv.trace(), curv.dense().trace())
        if method == "kfac":
            state = opt.preconditioner.states[layer]
            a, g = state.factor_in, state.factor_out

            def approx(x, k):
                values, vectors = torch.linalg.eigh(x)
                lam, u = truncate(values.clamp(min=0), vectors, k)
                if not truncated(u):
                    return u @ torch.diag(lam) @ u.T
                return u @ torch.diag(lam[:-1]) @ u.T + lam[-1] * (torch.eye(len(x), dtype=F64)
                                                                   - u @ u.T)

            assert torch.allclose(curv.dense(), torch.kron(approx(g, 2), approx(a, 2)),
                                  atol=1e-8)


def _trained(method: str, steps: int = 4, **options):
    import tekfac
    from tests.conftest import batch, tiny_net, train

    torch.manual_seed(0)
    net, shape = tiny_net("mlp")
    opt = tekfac.KroneckerOptimizer(net, method, **{**dict(cov_update_freq=1,
                                                           eigen_update_freq=2), **options})
    torch.manual_seed(1)
    batches = [batch(shape) for _ in range(steps)]
    train(net, opt, batches)
    return net, opt, shape


def test_truncated_state_checkpoints_and_refuses_another_rank():
    import copy

    import tekfac
    from tests.conftest import batch, train

    net, opt, shape = _trained("tekfac", basis_rank=2)
    saved = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    torch.manual_seed(2)
    more = [batch(shape) for _ in range(3)]
    train(net, opt, more)
    net2, opt2, _ = _trained("tekfac", steps=0, basis_rank=2)
    net2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(net2, opt2, more)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
    _, full, _ = _trained("tekfac", steps=0)
    with pytest.raises(ValueError, match="basis_in has shape"):
        full.load_state_dict(saved[1])
    assert isinstance(full, tekfac.KroneckerOptimizer)


@pytest.mark.parametrize("method", ["kfac", "tekfac"])
def test_cheap_refresh_keeps_truncated_bases_orthonormal_and_the_trace(method):
    _, opt, _ = _trained(method, steps=5, basis_rank=2, basis_refresh_freq=1,
                         eigen_update_freq=100)
    for layer in opt.preconditioner.layers:
        state = opt.preconditioner.states[layer]
        for side in ("in", "out"):
            basis, eig = getattr(state, f"basis_{side}"), getattr(state, f"eig_{side}")
            factor = getattr(state, f"factor_{side}")
            k = basis.shape[1]
            assert torch.allclose(basis.T @ basis, torch.eye(k, dtype=F64), atol=1e-10)
            if truncated(basis):  # refreshed from this step's factor: its trace kept
                assert k == 2 and len(eig) == 3
                assert torch.allclose((eig * sizes(basis, len(factor))).sum(), factor.trace())
        assert torch.isfinite(opt.curvature(layer.module).dense()).all()
