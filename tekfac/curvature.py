"""Per-layer curvature state and the public curvature object (DESIGN.md §2–§3).

A layer's approximation is ``F̂ = (U_out ⊗ U_in) diag(vec S) (U_out ⊗ U_in)^T``; its damped
form replaces ``S`` by ``D`` (:mod:`tekfac.damping`). Vectors are row-major flattenings of
``(d_out, d_in)`` matrices, so ``U_out ⊗ U_in`` is ``torch.kron(U_out, U_in)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from tekfac.config import CurvatureConfig
from tekfac.damping import eigenvalue_damping, pi_damping, trace_relative_damping
from tekfac.layers import KroneckerLayer


@dataclass
class LayerState:
    """Running statistics and the current eigenbasis of one layer (all in ``factor_dtype``).

    Attributes:
        factor_in: EMA of the input-side factor ``A`` or ``Φ``, ``(d_in, d_in)``.
        factor_out: EMA of the output-side factor ``G`` or ``Ψ``, ``(d_out, d_out)``.
        scale: EMA of ``δ`` (ones for KFAC, and for TEKFAC, whose corrected scaling replaces
            ``δ``), 0-dim.
        basis_in / basis_out: eigenvectors ``U_in (d_in, d_in)``, ``U_out (d_out, d_out)``.
        eig_in / eig_out: their eigenvalues, ``(d_in,)`` and ``(d_out,)``, clamped at 0.
        basis_scale: ``δ`` when the basis was computed, 0-dim.
        scaling: the diagonal ``S`` in the current basis, ``(d_out, d_in)``.
    """

    factor_in: Tensor | None = None
    factor_out: Tensor | None = None
    scale: Tensor | None = None
    basis_in: Tensor | None = None
    basis_out: Tensor | None = None
    eig_in: Tensor | None = None
    eig_out: Tensor | None = None
    basis_scale: Tensor | None = None
    scaling: Tensor | None = None

    def to_dict(self) -> dict[str, Tensor]:
        """The tensors that are set, keyed by field name (checkpoint format)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


#: Checkpoint keys of a layer's state, in one place.
STATE_KEYS = tuple(f.name for f in dataclasses.fields(LayerState))


def state_shapes(d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """The shape of every :class:`LayerState` field of a ``(d_out, d_in)`` layer."""
    return {"factor_in": (d_in, d_in), "factor_out": (d_out, d_out), "scale": (),
            "basis_in": (d_in, d_in), "basis_out": (d_out, d_out), "eig_in": (d_in,),
            "eig_out": (d_out,), "basis_scale": (), "scaling": (d_out, d_in)}


class Curvature:
    """The curvature approximation of one layer, as the optimizer currently applies it.

    It reflects the latest eigendecomposition and scaling update: with update frequencies of
    one it is built from the latest statistics; otherwise the basis may lag the factors by up
    to ``eigen_update_freq - 1`` steps, exactly as the preconditioner does.
    """

    def __init__(self, layer: KroneckerLayer, state: LayerState, config: CurvatureConfig):
        if state.basis_in is None or state.scaling is None:
            raise RuntimeError(f"Layer {layer.name!r} has no curvature yet: run at least one "
                               "optimizer step with statistics (a training-mode forward and "
                               "backward) first")
        self.layer, self._state, self._config = layer, state, config

    def eigenbasis(self) -> tuple[Tensor, Tensor]:
        """``(U_out, U_in)``: orthonormal, shapes ``(d_out, d_out)`` and ``(d_in, d_in)``."""
        return self._state.basis_out, self._state.basis_in

    def scaling(self) -> Tensor:
        """The undamped diagonal ``S`` of shape ``(d_out, d_in)``."""
        return self._state.scaling

    def trace(self) -> Tensor:
        """``tr F̂ = Σ S`` (0-dim)."""
        return self._state.scaling.sum()

    def damped_scaling(self) -> Tensor:
        """The damped diagonal ``D`` of shape ``(d_out, d_in)``, DESIGN.md §3."""
        s, c = self._state, self._config
        if c.damping_type == "pi":
            return pi_damping(s.eig_in, s.eig_out, s.basis_scale, c.damping)
        if c.damping_type == "trace_relative":
            return trace_relative_damping(s.scaling, c.damping, c.damping_floor)
        return eigenvalue_damping(s.scaling, c.damping)

    def dense(self, damped: bool = False) -> Tensor:
        """``F̂`` (or its damped form) as a dense ``(p, p)`` matrix, ``p = d_out·d_in``, in
        the row-major ``[W.flatten(1) | b]`` ordering."""
        diagonal = self.damped_scaling() if damped else self._state.scaling
        q = torch.kron(self._state.basis_out, self._state.basis_in)
        return (q * diagonal.reshape(-1)) @ q.T

    def precondition(self, matrix: Tensor) -> Tensor:
        """Apply the damped inverse to a ``(d_out, d_in)`` matrix ``M``:

        .. math:: U_{out} \\big((U_{out}^T M U_{in}) ⊘ D\\big) U_{in}^T.
        """
        u_out, u_in = self._state.basis_out, self._state.basis_in
        rotated = u_out.T @ matrix.to(u_in.dtype) @ u_in
        return (u_out @ (rotated / self.damped_scaling()) @ u_in.T).to(matrix.dtype)
