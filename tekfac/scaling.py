"""The two diagonals that scale the Kronecker-factored eigenbasis (docs/design.md §2(b), §4.3).

Every approximation is ``F̂ = (U_out ⊗ U_in) diag(vec S) (U_out ⊗ U_in)^T`` with ``S`` of shape
``(d_out, d_in)``; ``U_in (d_in, d_in)`` and ``U_out (d_out, d_out)`` are orthonormal bases
(``None`` stands for the identity: the basis of a diagonal side, :mod:`tekfac.layers`). A
scaling kind says how ``S`` follows a new basis, and whether it is re-fitted from per-example
statistics between bases. :data:`SCALING_KINDS` is the registry; a new kind is one entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from tekfac.factors import per_example_gradients
from tekfac.truncation import (
    carry_weights,
    grid_sizes,
    kept_count,
    rank_one_square_sums,
    split,
    square_sums,
    truncated,
)

if TYPE_CHECKING:
    from tekfac.records import Examples


class ScalingKind:
    """A diagonal kind.

    Attributes:
        uses_scale: whether ``S`` depends on the factor kind's scale ``δ`` (so that ``δ`` must
            be estimated with the factors).
        refits: whether ``S`` is re-fitted from per-example statistics every
            ``scale_update_freq`` steps (:meth:`estimate`); every rank then needs every basis.
        factor_eigenvalues: whether ``S`` is a product of the factors' eigenvalues (which
            factored π-damping needs).
    """

    uses_scale = False
    refits = False
    factor_eigenvalues = False

    def on_new_basis(self, scaling: Tensor | None, scale: Tensor, old: tuple[Tensor, Tensor] |
                     None, new: tuple[Tensor, Tensor], eigenvalues: tuple[Tensor, Tensor]
                     ) -> Tensor | None:
        """``S`` in a new basis ``new = (U_in, U_out)`` with factor eigenvalues
        ``eigenvalues = (λ_in, λ_out)``, from the current ``scaling`` in the ``old`` basis
        (``None`` before the first) and the factors' ``scale`` (``δ``)."""
        raise NotImplementedError

    def estimate(self, ex: Examples, basis_in: Tensor, basis_out: Tensor) -> Tensor:
        """Batch estimate of ``S`` in the current basis (kinds that :attr:`refits` only)."""
        raise NotImplementedError


class KroneckerEigenvalues(ScalingKind):
    """Products of the factors' eigenvalues: ``S = δ · λ_out λ_in^T`` (KFAC, TKFAC)."""

    uses_scale = True
    factor_eigenvalues = True

    def on_new_basis(self, scaling, scale, old, new, eigenvalues):
        return kronecker_scaling(*eigenvalues, scale)


class CorrectedEigenvalues(ScalingKind):
    """The EKFAC diagonal (George et al. 2018): the second moments of per-example gradients in
    the basis, re-fitted as an EMA and carried exactly into every new basis (EKFAC, TEKFAC)."""

    refits = True

    def on_new_basis(self, scaling, scale, old, new, eigenvalues):
        return None if scaling is None else carry_scaling(scaling, *old, *new)

    def estimate(self, ex: Examples, basis_in: Tensor, basis_out: Tensor) -> Tensor:
        return corrected_scaling(ex, basis_in, basis_out)


#: Scaling kind name → implementation (docs/design.md §2(b)).
SCALING_KINDS: dict[str, ScalingKind] = {
    "kronecker": KroneckerEigenvalues(),
    "corrected": CorrectedEigenvalues(),
}


def to_basis(matrix: Tensor, basis_out: Tensor | None, basis_in: Tensor | None) -> Tensor:
    """``U_out^T M U_in`` for ``M`` of shape ``(..., d_out, d_in)``; a ``None`` basis is the
    identity."""
    if basis_out is not None:
        matrix = basis_out.T @ matrix
    return matrix if basis_in is None else matrix @ basis_in


def from_basis(matrix: Tensor, basis_out: Tensor | None, basis_in: Tensor | None) -> Tensor:
    """``U_out M U_in^T``, the inverse of :func:`to_basis`."""
    if basis_out is not None:
        matrix = basis_out @ matrix
    return matrix if basis_in is None else matrix @ basis_in.T


def _rotated(x: Tensor, basis: Tensor | None) -> Tensor:
    """``x @ U`` (``x`` itself for the identity)."""
    return x if basis is None else x @ basis


def kronecker_scaling(eig_in: Tensor, eig_out: Tensor, scale: Tensor) -> Tensor:
    """Kronecker eigenvalues ``S = δ · λ_out λ_in^T`` (KFAC: ``δ = 1``); shape
    ``(d_out, d_in)``."""
    return scale * eig_out[:, None] * eig_in[None, :]


def corrected_scaling(ex: Examples, basis_in: Tensor | None, basis_out: Tensor | None
                      ) -> Tensor:
    """Batch estimate of the EKFAC diagonal from one forward's examples.

    .. math:: S = E[(U_{out}^T D_i U_{in})^{∘2}], \\quad D_i = G_i A_i^T,

    the exact second moment of per-example gradients in the basis; shape ``(d_out, d_in)``.
    For ``T = 1`` it is ``(g̃^{∘2})^T (ã^{∘2}) / N`` with ``ã = a U_in``, ``g̃ = g U_out``, so
    no per-example gradient is materialised. Otherwise the cheaper of two exact orders:
    rotate ``a`` and ``g`` first (``2NT(d_in² + d_out²)`` FLOPs) or rotate each ``D_i``
    (``2N d_in d_out (d_in + d_out)``); both then form ``D_i`` at ``2NT d_in d_out`` (the
    second without unfolding, :meth:`tekfac.records.Examples.gradients`). A diagonal side
    needs no rotation; with a diagonal input side (an embedding's one-hot inputs) ``D_i`` is
    formed without ``a``.
    """
    t, d_out = ex.g.shape[1:]
    d_in = ex.layer.d_in
    if truncated(basis_in) or truncated(basis_out):  # block averages on the extended grid
        k_out, k_in = kept_count(basis_out, d_out), kept_count(basis_in, d_in)
        if t == 1 and not ex.layer.diagonal_in:
            total = sum(rank_one_square_sums(g[:, 0], a[:, 0], basis_out, basis_in)
                        for a, g in ex.pieces())
        else:
            total = sum(square_sums(split(d, basis_out, basis_in), k_out, k_in)
                        for d in ex.gradients())
        return total / grid_sizes(basis_out, basis_in, total) / ex.n
    if t == 1 and basis_in is not None:
        total = sum(_rotated(g[:, 0], basis_out).square().T @ (a[:, 0] @ basis_in).square()
                    for a, g in ex.pieces())
    elif basis_in is None or t * (d_in**2 + d_out**2) > d_in * d_out * (d_in + d_out):
        total = sum(to_basis(d, basis_out, basis_in).square_().sum(dim=0)
                    for d in ex.gradients())
    else:
        total = sum(d.square().sum(dim=0) for a, g in ex.pieces()
                    for d in per_example_gradients(a @ basis_in, _rotated(g, basis_out)))
    return total / ex.n


def carry_scaling(scaling: Tensor, old_in: Tensor | None, old_out: Tensor | None,
                  new_in: Tensor | None, new_out: Tensor | None) -> Tensor:
    """The diagonal of the old ``F̂`` in a new basis (docs/design.md §4.3).

    .. math:: S' = R_{out} S R_{in}^T, \\quad R = (U_{new}^T U_{old})^{∘2}

    (``R = I`` on a diagonal side, whose basis stays the identity).
    """
    if old_out is not None:
        scaling = carry_weights(new_out, old_out, new_out.shape[0]) @ scaling
    if old_in is not None:
        scaling = scaling @ carry_weights(new_in, old_in, new_in.shape[0]).T
    return scaling
