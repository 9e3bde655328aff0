"""The two diagonals that scale the Kronecker-factored eigenbasis (DESIGN.md §2(b), §4.3).

Every approximation is ``F̂ = (U_out ⊗ U_in) diag(vec S) (U_out ⊗ U_in)^T`` with ``S`` of shape
``(d_out, d_in)``; ``U_in (d_in, d_in)`` and ``U_out (d_out, d_out)`` are orthonormal bases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from tekfac.factors import per_example_gradients

if TYPE_CHECKING:
    from tekfac.capture import Examples


def kronecker_scaling(eig_in: Tensor, eig_out: Tensor, scale: Tensor) -> Tensor:
    """Kronecker eigenvalues ``S = δ · λ_out λ_in^T`` (KFAC: ``δ = 1``); shape
    ``(d_out, d_in)``."""
    return scale * eig_out[:, None] * eig_in[None, :]


def corrected_scaling(ex: Examples, basis_in: Tensor, basis_out: Tensor) -> Tensor:
    """Batch estimate of the EKFAC diagonal (George et al. 2018) from one forward's examples.

    .. math:: S = E[(U_{out}^T D_i U_{in})^{∘2}], \\quad D_i = G_i A_i^T,

    the exact second moment of per-example gradients in the basis; shape ``(d_out, d_in)``.
    For ``T = 1`` it is ``(g̃^{∘2})^T (ã^{∘2}) / N`` with ``ã = a U_in``, ``g̃ = g U_out``, so
    no per-example gradient is materialised. Otherwise the cheaper of two exact orders:
    rotate ``a`` and ``g`` first (``2NT(d_in² + d_out²)`` FLOPs) or rotate each ``D_i``
    (``2N d_in d_out (d_in + d_out)``); both then form ``D_i`` at ``2NT d_in d_out`` (the
    second without unfolding, :meth:`tekfac.capture.Examples.gradients`).
    """
    t, d_out = ex.g.shape[1:]
    d_in = ex.layer.d_in
    if t == 1:
        total = sum((g[:, 0] @ basis_out).square().T @ (a[:, 0] @ basis_in).square()
                    for a, g in ex.pieces())
    elif t * (d_in**2 + d_out**2) > d_in * d_out * (d_in + d_out):
        total = sum((basis_out.T @ d @ basis_in).square_().sum(dim=0) for d in ex.gradients())
    else:
        total = sum(d.square().sum(dim=0) for a, g in ex.pieces()
                    for d in per_example_gradients(a @ basis_in, g @ basis_out))
    return total / ex.n


def carry_scaling(scaling: Tensor, old_in: Tensor, old_out: Tensor, new_in: Tensor,
                  new_out: Tensor) -> Tensor:
    """The diagonal of the old ``F̂`` in a new basis (DESIGN.md §4.3).

    .. math:: S' = R_{out} S R_{in}^T, \\quad R = (U_{new}^T U_{old})^{∘2}.
    """
    r_out = (new_out.T @ old_out).square()
    r_in = (new_in.T @ old_in).square()
    return r_out @ scaling @ r_in.T
