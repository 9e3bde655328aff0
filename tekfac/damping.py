"""Damping: the diagonal ``D`` of the damped approximation in its eigenbasis (docs/design.md §3).

The preconditioner of a layer is ``(U_out ⊗ U_in) diag(vec D)^{-1} (U_out ⊗ U_in)^T``, so
``D`` (shape ``(d_out, d_in)``, all positive) says everything about how damping is applied.
:data:`DAMPING_KINDS` is the registry of the kinds; a new kind is one entry.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tekfac.truncation import grid_sizes, side_sizes

if TYPE_CHECKING:
    from tekfac.state import LayerState


class DampingKind:
    """A damping kind.

    Attributes:
        needs_factor_eigenvalues: whether it damps the factors rather than ``S``, so that
            ``S`` must be a product of factor eigenvalues (KFAC, TKFAC).
    """

    needs_factor_eigenvalues = False

    def damped(self, state: LayerState, damping: float, floor: float) -> Tensor:
        """``D`` of shape ``(d_out, d_in)`` for a layer with a basis and a scaling, given the
        ``damping`` hyper-parameter (λ or γ) and the ``floor`` of relative dampings."""
        raise NotImplementedError

    def isotropic(self, state: LayerState, damping: float, floor: float) -> float:
        """The ``λ`` of the ``F̂ + λI`` that ``D`` stands for: the damping of the layer's
        block in an exact quadratic model (the quadratic step rule, docs/design.md §4.7)."""
        return damping


class EigenvalueDamping(DampingKind):
    """``D = S + λ`` (:func:`eigenvalue_damping`)."""

    def damped(self, state, damping, floor):
        return eigenvalue_damping(state.scaling, damping)


class PiDamping(DampingKind):
    """Factored Tikhonov damping (:func:`pi_damping`)."""

    needs_factor_eigenvalues = True

    def damped(self, state, damping, floor):
        return pi_damping(state.eig_in, state.eig_out, state.basis_scale, damping,
                          side_sizes(state.basis_in, state.eig_in),
                          side_sizes(state.basis_out, state.eig_out))


class TraceRelativeDamping(DampingKind):
    """``D = S + max(γ tr F̂ / p, floor)`` (:func:`trace_relative_damping`)."""

    def damped(self, state, damping, floor):
        size = grid_sizes(state.basis_out, state.basis_in, state.scaling)
        return trace_relative_damping(state.scaling, damping, floor, size)

    def isotropic(self, state, damping, floor):
        size = grid_sizes(state.basis_out, state.basis_in, state.scaling)
        return float(trace_relative_lambda(state.scaling, damping, floor, size))


#: Damping kind name → implementation (docs/design.md §3).
DAMPING_KINDS: dict[str, DampingKind] = {
    "eigenvalue": EigenvalueDamping(),
    "pi": PiDamping(),
    "trace_relative": TraceRelativeDamping(),
}


def eigenvalue_damping(scaling: Tensor, damping: float) -> Tensor:
    """Tikhonov damping in the eigenbasis: ``D = S + λ``, i.e. ``(F̂ + λI)``."""
    return scaling + damping


def trace_relative_damping(scaling: Tensor, gamma: float, floor: float,
                           size: Tensor | None = None) -> Tensor:
    """Damping relative to the layer's mean eigenvalue: ``D = S + λ_l`` with

    .. math:: λ_l = \\max(γ \\operatorname{tr}(F̂_l) / p_l, \\text{floor}),

    where ``tr F̂_l = Σ S`` and ``p_l = d_out·d_in`` (our reading of TKFAC's damping).
    """
    return scaling + trace_relative_lambda(scaling, gamma, floor, size)


def trace_relative_lambda(scaling: Tensor, gamma: float, floor: float,
                          size: Tensor | None = None) -> Tensor:
    """``λ_l = max(γ tr(F̂_l) / p_l, floor)`` (0-dim) of :func:`trace_relative_damping`;
    ``size`` counts each entry of ``S`` for the eigenvalues it stands for (all ones by
    default)."""
    if size is None:
        size = torch.ones_like(scaling)
    return (gamma * (scaling * size).sum() / size.sum()).clamp(min=floor)


def pi_damping(eig_in: Tensor, eig_out: Tensor, scale: Tensor, damping: float,
               size_in: Tensor | None = None, size_out: Tensor | None = None) -> Tensor:
    """Factored Tikhonov damping (Martens & Grosse 2015, §6.3) of ``(√δ Ψ) ⊗ (√δ Φ)``:

    .. math:: (G + \\tfrac{\\sqrt{λ}}{π} I) ⊗ (A + π\\sqrt{λ} I), \\quad
              π = \\sqrt{\\frac{\\operatorname{tr}(A)/\\dim A}{\\operatorname{tr}(G)/\\dim G}},

    with ``A = √δ·factor_in``, ``G = √δ·factor_out`` (``δ = 1`` for KFAC). In the eigenbasis
    ``D = (λ_G + √λ/π)(λ_A + π√λ)^T``. ``π = 1`` when a factor is zero.
    """
    root = scale.sqrt()
    lam_in, lam_out = root * eig_in, root * eig_out
    size_in = torch.ones_like(lam_in) if size_in is None else size_in
    size_out = torch.ones_like(lam_out) if size_out is None else size_out
    mean_in = (lam_in * size_in).sum() / size_in.sum()  # tr / dim, remainders weighted
    mean_out = (lam_out * size_out).sum() / size_out.sum()
    ok = (mean_in > 0) & (mean_out > 0)
    pi = torch.where(ok, (mean_in / torch.where(ok, mean_out, 1.0)).sqrt(), 1.0)
    sqrt_damping = math.sqrt(damping)
    return (lam_out + sqrt_damping / pi)[:, None] * (lam_in + pi * sqrt_damping)[None, :]
