"""The public curvature object of one layer (docs/design.md §2–§3).

A layer's approximation is ``c·F̂``, ``F̂ = (U_out ⊗ U_in) diag(vec S) (U_out ⊗ U_in)^T`` the
per-example Fisher of §1 and ``c`` the multiplier that makes it the curvature of the loss as
the user reduced it (§3); its damped form ``c·F̂ + λ`` replaces ``c·S`` by ``D``
(:mod:`tekfac.damping`). Vectors are row-major flattenings of
``(d_out, d_in)`` matrices, so ``U_out ⊗ U_in`` is ``torch.kron(U_out, U_in)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tekfac.config import CurvatureConfig
from tekfac.damping import DAMPING_KINDS
from tekfac.layers import KroneckerLayer
from tekfac.scaling import from_basis, to_basis
from tekfac.state import LayerState
from tekfac.truncation import grid_sizes, kept_count, merge, scale, split, square_sums, truncated


class Curvature:
    """The curvature approximation of one layer, as the optimizer currently applies it.

    It reflects the latest eigendecomposition and scaling update: with update frequencies of
    one it is built from the latest statistics; otherwise the basis may lag the factors by up
    to ``eigen_update_freq - 1`` steps, exactly as the preconditioner does. Everything it
    returns is in the loss's units: ``multiplier`` (``c``) times the statistics ``S``.
    """

    def __init__(self, layer: KroneckerLayer, state: LayerState, config: CurvatureConfig,
                 multiplier: float = 1.0):
        if not state.has_basis or state.scaling is None:
            raise RuntimeError(f"Layer {layer.name!r} has no curvature yet: run at least one "
                               "optimizer step with statistics (a training-mode forward and "
                               "backward) first")
        self.layer, self._state, self._config = layer, state, config
        #: ``c``: the curvature of the loss is ``c·F̂`` (docs/design.md §3)
        self.multiplier = multiplier

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        """``(U_out, U_in)``: orthonormal, shapes ``(d_out, d_out)`` and ``(d_in, d_in)`` (the
        identity on a diagonal side)."""
        s = self._state
        return _or_identity(s.basis_out, s.eig_out), _or_identity(s.basis_in, s.eig_in)

    def scaling(self) -> Tensor:
        """The undamped diagonal ``c·S`` of shape ``(d_out, d_in)``."""
        return self._state.scaling * self.multiplier

    def trace(self) -> Tensor:
        """``tr(c·F̂) = c Σ S`` (0-dim), each remainder entry counted for its piece's size."""
        s = self._state
        return (s.scaling * grid_sizes(s.basis_out, s.basis_in, s.scaling)).sum() * self.multiplier

    def _truncated(self) -> bool:
        return truncated(self._state.basis_in) or truncated(self._state.basis_out)

    def _kept(self) -> tuple[int, int]:
        """The kept vectors of the output and input sides."""
        s = self._state
        return kept_count(s.basis_out, self.layer.d_out), kept_count(s.basis_in, self.layer.d_in)

    def _apply(self, matrix: Tensor, diagonal: Tensor, divide: bool) -> Tensor:
        """``M`` multiplied or divided piecewise by a diagonal on the extended grid."""
        s = self._state
        pieces = split(matrix, s.basis_out, s.basis_in)
        return merge(scale(pieces, diagonal, *self._kept(), divide), s.basis_out, s.basis_in)

    def damped_scaling(self) -> Tensor:
        """The damped diagonal ``D`` of ``c·F̂`` with the damping ``λ``, shape
        ``(d_out, d_in)``, docs/design.md §3: every damping kind has ``D(c·F̂, λ) =
        c·D(F̂, λ/c)`` (its floor likewise ``/c``), which is how it is computed."""
        c, config = self.multiplier, self._config
        kind = DAMPING_KINDS[config.damping_type]
        return kind.damped(self._state, config.damping / c, config.damping_floor / c) * c

    def isotropic_damping(self) -> float:
        """The ``λ`` of the ``c·F̂ + λI`` that :meth:`damped_scaling` stands for, in the loss's
        units: the damping, or the trace-relative kind's ``max(γ tr(c·F̂)/p, floor)`` (π-damping
        is a factored approximation of ``+λI``, Martens & Grosse 2015 §6.3)."""
        c, config = self.multiplier, self._config
        kind = DAMPING_KINDS[config.damping_type]
        return kind.isotropic(self._state, config.damping / c, config.damping_floor / c) * c

    def dense(self, damped: bool = False) -> Tensor:
        """``c·F̂`` (or its damped form) as a dense ``(p, p)`` matrix, ``p = d_out·d_in``,
        in the row-major ``[W.flatten(1) | b]`` ordering."""
        diagonal = self.damped_scaling() if damped else self.scaling()
        if self._truncated():  # column by column through the pieces
            d_out, d_in = self.layer.d_out, self.layer.d_in
            eye = torch.eye(d_out * d_in, dtype=diagonal.dtype, device=diagonal.device)
            return torch.stack([self._apply(e.reshape(d_out, d_in), diagonal, False).reshape(-1)
                                for e in eye], 1)
        q = torch.kron(*self.eigenbasis())
        return (q * diagonal.reshape(-1)) @ q.T

    def quadratic_form(self, matrix: Tensor) -> Tensor:
        """``vᵀ c·F̂ v`` for ``v`` the row-major flattening of a ``(d_out, d_in)`` matrix ``M``
        (undamped), as 0-dim tensor in the scaling's dtype:

        .. math:: c ⟨S, (U_{out}^T M U_{in})^{∘2}⟩.
        """
        s = self._state
        if self._truncated():
            pieces = split(matrix.to(s.scaling.dtype), s.basis_out, s.basis_in)
            return (square_sums(pieces, *self._kept()) * s.scaling).sum() * self.multiplier
        rotated = to_basis(matrix.to(s.scaling.dtype), s.basis_out, s.basis_in)
        return (rotated.square() * s.scaling).sum() * self.multiplier

    def precondition(self, matrix: Tensor) -> Tensor:
        """Apply the damped inverse ``(c·F̂ + λ)^{-1}`` to a ``(d_out, d_in)`` matrix ``M``:

        .. math:: U_{out} \\big((U_{out}^T M U_{in}) ⊘ D\\big) U_{in}^T.
        """
        if self._truncated():
            damped = self.damped_scaling()
            return self._apply(matrix.to(damped.dtype), damped, True).to(matrix.dtype)
        u_out, u_in = self._state.basis_out, self._state.basis_in
        rotated = to_basis(matrix.to(self._state.scaling.dtype), u_out, u_in)
        return from_basis(rotated / self.damped_scaling(), u_out, u_in).to(matrix.dtype)


def _or_identity(basis: Tensor | None, eigenvalues: Tensor) -> Tensor:
    """``basis``, or the identity for a diagonal side's ``None``."""
    if basis is not None:
        return basis
    return torch.eye(len(eigenvalues), dtype=eigenvalues.dtype, device=eigenvalues.device)
