"""Rank-k eigenbases with an isotropic remainder (``basis_rank``, docs/design.md §2(d)).

A side of a block keeps ``k < d`` eigenvectors ``U (d, k)`` of its factor; the rest of the
spectrum is one value on the complement ``W = range(U)^⊥`` (dimension ``d - k``). The block
``F̂`` is then diagonal in the four (or two) orthogonal pieces "kept ⊗ kept", "kept ⊗ rest",
"rest ⊗ kept" and "rest ⊗ rest", and isotropic on each rest piece, so a diagonal on the
*extended grid* ``S (k_out + r_out, k_in + r_in)`` (``r = 1`` on a truncated side, whose last
index stands for its remainder) describes it completely: entry ``[a, b]`` is ``F̂``'s value
on the piece ``a ⊗ b``. A side's basis is ``None`` (diagonal side: the identity), square (full)
or ``(d, k)`` with ``k < d`` (truncated).

Everything a preconditioner does in its eigenbasis is then done piecewise (:func:`split`,
:func:`merge`): a matrix ``M (d_out, d_in)`` splits into its kept coordinates and its remainder
components (kept in the original coordinates, projected onto ``W``), which costs
``O(d_out d_in (k_out + k_in))`` instead of ``O(d_out d_in (d_out + d_in))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: a split matrix: (out piece, in piece) -> tensor, pieces "k" (kept) and "r" (remainder)
Pieces = dict[tuple[str, str], Tensor]


def truncated(basis: Tensor | None) -> bool:
    """Whether a side's basis keeps fewer vectors than its dimension."""
    return basis is not None and basis.shape[1] < basis.shape[0]


def truncate(values: Tensor, vectors: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """From an ascending eigendecomposition ``(values (d,), vectors (d, d))`` of a PSD factor
    ``X``, the ``k`` largest eigenpairs, largest first, and the remainder value
    ``ρ = (tr X - Σ_kept λ) / (d - k)`` (clamped at 0) that keeps the trace:
    ``(extended values (k + 1,), basis (d, k))``. ``k ≥ d`` keeps everything (no remainder)."""
    d = len(values)
    if k >= d:
        return values, vectors
    top = values[-k:].flip(0)
    rest = ((values.sum() - top.sum()) / (d - k)).clamp(min=0)
    return torch.cat([top, rest[None]]), vectors[:, -k:].flip(1).contiguous()


def with_remainder(values: Tensor, basis: Tensor, matrix: Tensor) -> tuple[Tensor, Tensor]:
    """The Rayleigh quotients ``values (k,)`` of a truncated ``basis (d, k)`` of ``matrix``
    extended by the trace-preserving remainder value (the cheap refresh's result)."""
    d, k = basis.shape
    rest = ((matrix.diagonal().sum() - values.sum()) / (d - k)).clamp(min=0)
    return torch.cat([values, rest[None]]), basis


def sizes(basis: Tensor | None, d: int) -> Tensor:
    """How many unit directions each index of a side's extended grid stands for: 1 per kept
    vector, ``d - k`` for the remainder."""
    if not truncated(basis):
        return torch.ones(d)
    k = basis.shape[1]
    return torch.cat([torch.ones(k), torch.tensor([float(d - k)])])


def _split_side(x: Tensor, basis: Tensor | None, side: str) -> dict[str, Tensor]:
    """The pieces of ``x (..., d_out, d_in)`` along one side (``"out"``: rows, ``"in"``)."""
    if basis is None:
        return {"k": x}
    if side == "out":
        kept = basis.T @ x
        if not truncated(basis):
            return {"k": kept}
        return {"k": kept, "r": x - basis @ kept}
    kept = x @ basis
    if not truncated(basis):
        return {"k": kept}
    return {"k": kept, "r": x - kept @ basis.T}


def split(matrix: Tensor, basis_out: Tensor | None, basis_in: Tensor | None) -> Pieces:
    """``M (..., d_out, d_in)`` as its pieces: kept coordinates ``U_outᵀ M U_in`` and the
    remainder components (original coordinates) of each truncated side."""
    pieces: Pieces = {}
    for o, rows in _split_side(matrix, basis_out, "out").items():
        for i, part in _split_side(rows, basis_in, "in").items():
            pieces[(o, i)] = part
    return pieces


def merge(pieces: Pieces, basis_out: Tensor | None, basis_in: Tensor | None) -> Tensor:
    """The inverse of :func:`split`: ``Σ`` of the pieces mapped back to original coordinates."""
    rows = {}
    for (o, i), part in pieces.items():
        back = part if i == "r" or basis_in is None else part @ basis_in.T
        rows[o] = back if o not in rows else rows[o] + back
    total = None
    for o, part in rows.items():
        back = part if o == "r" or basis_out is None else basis_out @ part
        total = back if total is None else total + back
    return total


def _grid_index(piece: str, count: int) -> slice:
    return slice(0, count) if piece == "k" else slice(count, count + 1)


def scale(pieces: Pieces, grid: Tensor, k_out: int, k_in: int, divide: bool) -> Pieces:
    """Each piece multiplied (or divided) by its entries of the extended ``grid``: a kept
    coordinate by its own entry, a remainder component by its piece's single value."""
    out = {}
    for (o, i), part in pieces.items():
        values = grid[_grid_index(o, k_out), _grid_index(i, k_in)]
        out[(o, i)] = part / values if divide else part * values
    return out


def square_sums(pieces: Pieces, k_out: int, k_in: int) -> Tensor:
    """The sum of squares of each piece on the extended grid: ``(k_out + r_out, k_in + r_in)``
    (kept coordinates squared entry by entry, a remainder piece summed over its directions)."""
    r_out = int(any(o == "r" for o, _ in pieces))
    r_in = int(any(i == "r" for _, i in pieces))
    ref = next(iter(pieces.values()))
    grid = ref.new_zeros(k_out + r_out, k_in + r_in)
    for (o, i), part in pieces.items():
        sq = part.square()
        if o == "r":
            sq = sq.sum(dim=-2, keepdim=True)
        if i == "r":
            sq = sq.sum(dim=-1, keepdim=True)
        while sq.dim() > 2:  # a batch of matrices: summed
            sq = sq.sum(dim=0)
        grid[_grid_index(o, k_out), _grid_index(i, k_in)] = sq
    return grid


def _coordinates(x: Tensor, basis: Tensor | None) -> Tensor:
    """The squared coordinates of the rows of ``x (N, d)`` on a side's grid: kept
    coordinates squared, then the remainder's squared norm if the side is truncated."""
    if basis is None:
        return x.square()
    kept = x @ basis
    sq = kept.square()
    if not truncated(basis):
        return sq
    rest = (x.square().sum(dim=1) - sq.sum(dim=1)).clamp(min=0)
    return torch.cat([sq, rest[:, None]], dim=1)


def rank_one_square_sums(g: Tensor, a: Tensor, basis_out: Tensor | None,
                         basis_in: Tensor | None) -> Tensor:
    """:func:`square_sums` of the rank-one matrices ``g_i a_iᵀ`` summed over ``i``
    (``g (N, d_out)``, ``a (N, d_in)``), without forming them: the squared coordinates of a
    rank-one piece are products of its two sides' (``O(N (d_out k_out + d_in k_in))``)."""
    return _coordinates(g, basis_out).T @ _coordinates(a, basis_in)


def side_sizes(basis: Tensor | None, like: Tensor) -> Tensor:
    """:func:`sizes` of a side from its basis, for a vector ``like`` along its extended grid
    (its eigenvalues, a row of ``S``), in ``like``'s dtype."""
    if truncated(basis):
        return sizes(basis, basis.shape[0]).to(like)
    return torch.ones_like(like)


def grid_sizes(basis_out: Tensor | None, basis_in: Tensor | None, grid: Tensor) -> Tensor:
    """:func:`sizes` of both sides as a matrix the shape of the extended ``grid``
    ``(k_out + r_out, k_in + r_in)``: the unit directions of ``F̂`` each entry stands for."""
    return side_sizes(basis_out, grid[:, 0])[:, None] * side_sizes(basis_in, grid[0])[None, :]


def grid_length(k: int, d: int) -> int:
    """The extended grid's length on a side of width ``d`` keeping ``k`` vectors: ``k``, plus
    one remainder index if ``k < d``."""
    return k + int(k < d)


def kept_count(basis: Tensor | None, d: int) -> int:
    """The kept vectors of a side of width ``d`` (``d`` for a diagonal or full side)."""
    return basis.shape[1] if basis is not None else d


def carry_weights(new: Tensor | None, old: Tensor | None, d: int) -> Tensor:
    """``R`` with ``S' = R_out S R_inᵀ`` the block averages of the old ``F̂``'s diagonal in the
    new basis (one side; docs: ``R = (U_newᵀ U_old)^∘2`` extended by the remainders):
    kept–kept ``(u'ᵀu)²``, new kept from the old remainder ``1 - Σ_j (u'ᵀu_j)²``, the new
    remainder from an old kept vector ``‖(I - P')u‖²/(d - k')`` and from the old remainder
    ``tr((I - P')(I - P))/(d - k')``."""
    if new is None:
        return torch.eye(d)
    if not truncated(new) and not truncated(old):
        return (new.T @ old).square()
    overlap = (new.T @ old).square()  # (k', k)
    rows = [overlap]
    if truncated(old):
        rows = [torch.cat([overlap, (1 - overlap.sum(dim=1, keepdim=True)).clamp(min=0)], 1)]
    if truncated(new):
        k_new = new.shape[1]
        left = (1 - overlap.sum(dim=0, keepdim=True)).clamp(min=0) / (d - k_new)
        if truncated(old):
            k_old = old.shape[1]
            rest = (d - k_new - k_old + overlap.sum()) / (d - k_new)
            left = torch.cat([left, rest.clamp(min=0).reshape(1, 1)], 1)
        rows.append(left)
    return torch.cat(rows, 0)
