"""Damping: the diagonal ``D`` of the damped approximation in its eigenbasis (DESIGN.md §3).

The preconditioner of a layer is ``(U_out ⊗ U_in) diag(vec D)^{-1} (U_out ⊗ U_in)^T``, so
``D`` (shape ``(d_out, d_in)``, all positive) says everything about how damping is applied.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def eigenvalue_damping(scaling: Tensor, damping: float) -> Tensor:
    """Tikhonov damping in the eigenbasis: ``D = S + λ``, i.e. ``(F̂ + λI)``."""
    return scaling + damping


def trace_relative_damping(scaling: Tensor, gamma: float, floor: float) -> Tensor:
    """Damping relative to the layer's mean eigenvalue: ``D = S + λ_l`` with

    .. math:: λ_l = \\max(γ \\operatorname{tr}(F̂_l) / p_l, \\text{floor}),

    where ``tr F̂_l = Σ S`` and ``p_l = d_out·d_in`` (our reading of TKFAC's damping).
    """
    lam = (gamma * scaling.sum() / scaling.numel()).clamp(min=floor)
    return scaling + lam


def pi_damping(eig_in: Tensor, eig_out: Tensor, scale: Tensor, damping: float) -> Tensor:
    """Factored Tikhonov damping (Martens & Grosse 2015, §6.3) of ``(√δ Ψ) ⊗ (√δ Φ)``:

    .. math:: (G + \\tfrac{\\sqrt{λ}}{π} I) ⊗ (A + π\\sqrt{λ} I), \\quad
              π = \\sqrt{\\frac{\\operatorname{tr}(A)/\\dim A}{\\operatorname{tr}(G)/\\dim G}},

    with ``A = √δ·factor_in``, ``G = √δ·factor_out`` (``δ = 1`` for KFAC). In the eigenbasis
    ``D = (λ_G + √λ/π)(λ_A + π√λ)^T``. ``π = 1`` when a factor is zero.
    """
    root = scale.sqrt()
    lam_in, lam_out = root * eig_in, root * eig_out
    mean_in, mean_out = lam_in.mean(), lam_out.mean()
    ok = (mean_in > 0) & (mean_out > 0)
    pi = torch.where(ok, (mean_in / torch.where(ok, mean_out, 1.0)).sqrt(), 1.0)
    sqrt_damping = math.sqrt(damping)
    return (lam_out + sqrt_damping / pi)[:, None] * (lam_in + pi * sqrt_damping)[None, :]
