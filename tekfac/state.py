"""One layer's curvature state and its updates (docs/design.md §4.1–3); checkpoint keys.

:class:`LayerState` holds a layer's running statistics, its current eigenbasis and the
diagonal ``S`` in that basis, and knows how each is updated: a bias-corrected exponential
average of new statistics (:meth:`LayerState.fold_factors`, :meth:`LayerState.fold_scaling`,
docs/design.md §4.1) and the installation of a
fresh eigendecomposition (:meth:`LayerState.install_basis`), with ``S`` following the basis as
the scaling kind says. Its fields are the checkpoint format (:data:`STATE_KEYS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from tekfac.factors import FactorStatistics
from tekfac.layers import KroneckerLayer
from tekfac.scaling import ScalingKind
from tekfac.truncation import grid_length


@dataclass
class LayerState:
    """Running statistics and the current eigenbasis of one layer (all in ``factor_dtype``).

    A diagonal side (:mod:`tekfac.layers`) keeps its factor as a vector, ``(d_in,)`` or
    ``(d_out,)``, and has no basis tensor: its eigenbasis is the identity, its eigenvalues are
    the factor's entries.

    Attributes:
        factor_in: average of the input-side factor ``A`` or ``Φ``, ``(d_in, d_in)``.
        factor_out: average of the output-side factor ``G`` or ``Ψ``, ``(d_out, d_out)``.
        scale: average of ``δ`` (ones for KFAC, and for TEKFAC, whose corrected scaling
            replaces ``δ``), 0-dim.
        factor_weight: the total weight ``w`` of the batches in the factors' average,
            ``w ← β w + 1`` per update (``Σ_k β^k``), 0-dim float64.
        basis_in / basis_out: eigenvectors ``U_in (d_in, d_in)``, ``U_out (d_out, d_out)``
            (``None`` on a diagonal side).
        eig_in / eig_out: their eigenvalues, ``(d_in,)`` and ``(d_out,)``, clamped at 0.
        basis_scale: ``δ`` when the basis was computed, 0-dim.
        scaling: the diagonal ``S`` in the current basis, ``(d_out, d_in)``.
        scaling_weight: the same total weight for a re-fitted ``S`` (EKFAC, TEKFAC).
    """

    factor_in: Tensor | None = None
    factor_out: Tensor | None = None
    scale: Tensor | None = None
    factor_weight: Tensor | None = None
    basis_in: Tensor | None = None
    basis_out: Tensor | None = None
    eig_in: Tensor | None = None
    eig_out: Tensor | None = None
    basis_scale: Tensor | None = None
    scaling: Tensor | None = None
    scaling_weight: Tensor | None = None

    @property
    def has_basis(self) -> bool:
        """Whether an eigendecomposition has been installed."""
        return self.eig_out is not None

    def fold_factors(self, stats: FactorStatistics, decay: float) -> None:
        """Fold a batch's factors and ``δ`` into their averages, the batch ``k`` updates ago
        weighted by ``decay^k`` (:func:`average`); the first update takes the batch estimate
        as it is (no identity prior)."""
        self.factor_weight = total_weight(self.factor_weight, self.factor_in, decay,
                                          stats.factor_in.device)
        self.factor_in = average(self.factor_in, stats.factor_in, self.factor_weight)
        self.factor_out = average(self.factor_out, stats.factor_out, self.factor_weight)
        self.scale = average(self.scale, stats.scale, self.factor_weight)

    def install_basis(self, eig_in: Tensor, basis_in: Tensor | None, eig_out: Tensor,
                      basis_out: Tensor | None, kind: ScalingKind) -> None:
        """Make a fresh eigendecomposition of the factors the basis, ``S`` following it as
        ``kind`` says (Kronecker eigenvalues, or the old ``F̂``'s diagonal carried over); a
        ``None`` basis is that of a diagonal side, the identity."""
        old = (self.basis_in, self.basis_out) if self.has_basis else None
        self.scaling = kind.on_new_basis(self.scaling, self.scale, old, (basis_in, basis_out),
                                         (eig_in, eig_out))
        self.basis_in, self.basis_out = basis_in, basis_out
        self.eig_in, self.eig_out, self.basis_scale = eig_in, eig_out, self.scale

    def fold_scaling(self, estimate: Tensor, decay: float) -> None:
        """Fold a re-fitted ``S`` in the current basis into its average, as
        :meth:`fold_factors` does (the first is taken as it is)."""
        self.scaling_weight = total_weight(self.scaling_weight, self.scaling, decay,
                                           estimate.device)
        self.scaling = average(self.scaling, estimate, self.scaling_weight)

    def to_dict(self, layer: KroneckerLayer, dtype: torch.dtype) -> dict[str, Tensor]:
        """Every field ``layer`` can have (:func:`state_shapes`), keyed by name, a copy where
        set and zeros (``dtype``; the weights float64) where not, and ``"set"``: a bool
        tensor of which are set, in that order (checkpoint format 3). Complete, so that
        ``torch.distributed.checkpoint`` can load into a fresh optimizer's state dict."""
        device = layer.module.weight.device
        entry = {}
        for key, shape in state_shapes(layer).items():
            value = getattr(self, key)
            entry[key] = value.detach().clone() if value is not None else torch.zeros(
                shape, dtype=torch.float64 if key.endswith("_weight") else dtype, device=device)
        entry["set"] = torch.tensor([getattr(self, key) is not None
                                     for key in state_shapes(layer)], device=device)
        return entry

    @classmethod
    def from_dict(cls, entry: dict[str, Tensor], layer: KroneckerLayer, device: torch.device
                  ) -> LayerState:
        """The state saved by :meth:`to_dict` for ``layer`` (or, without ``"set"``, the set
        fields alone, as formats 1 and 2 saved them), on ``device``; ``ValueError`` for
        unknown keys or wrong shapes."""
        shapes = state_shapes(layer)
        entry = dict(entry)
        flags = entry.pop("set", None)
        unknown = set(entry) - set(shapes)
        if unknown:
            raise ValueError(f"state_dict layer {layer.name!r} has unknown keys {unknown} (a "
                             "basis saved for a side that is diagonal here?)")
        if flags is not None:
            if set(entry) != set(shapes) or len(flags) != len(shapes):
                raise ValueError(
                    f"state_dict does not match layer {layer.name!r}: it lacks "
                    f"{sorted(set(shapes) - set(entry))} (a side saved diagonal that is dense "
                    "here: was max_factor_dim changed?)")
            entry = {key: entry[key] for key, flag in zip(shapes, flags.tolist()) if flag}
        for key, shape in shapes.items():
            value = entry.get(key)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"state_dict does not match layer {layer.name!r}: {key} has "
                                 f"shape {tuple(value.shape)}, expected {shape}")
        return cls(**{k: v.to(device) for k, v in entry.items()})


def total_weight(weight: Tensor | None, value: Tensor | None, decay: float,
                 device: torch.device) -> Tensor:
    """The total weight after one more update, ``β w + 1`` (on ``device``): 1 for the first
    (``value`` is ``None``). A state saved before the weight was kept has averaged for long:
    its weight is taken as converged, ``1/(1 - β)``, which continues the plain EMA it was."""
    if value is None:
        return torch.ones((), dtype=torch.float64, device=device)
    if weight is None:
        weight = torch.full((), 1 / (1 - decay), dtype=torch.float64, device=device)
    return weight * decay + 1


def average(old: Tensor | None, new: Tensor, weight: Tensor) -> Tensor:
    """The bias-corrected exponential average ``X ← X + (X_batch − X)/w`` for the total
    weight ``w = Σ_{k<n} β^k`` of ``n`` updates: each batch ``k`` updates old weighs
    ``β^k / w``, so early averages are running means rather than dominated by the first batch
    (kfac-jax's ``WeightedMovingAverage``; Martens & Grosse 2015 §5 use ``min(1 − 1/n, β)``);
    for large ``n``, ``X ← β X + (1 − β) X_batch``."""
    if old is None:
        return new
    return torch.lerp(old, new, weight.reciprocal().to(old.dtype))


#: Checkpoint keys of a layer's state, in one place.
STATE_KEYS = tuple(f.name for f in dataclasses.fields(LayerState))


def state_shapes(layer: KroneckerLayer) -> dict[str, tuple[int, ...]]:
    """The shape of every :class:`LayerState` field that ``layer`` can have (a diagonal side
    has a vector factor and no basis)."""
    d_in, d_out = layer.d_in, layer.d_out
    k_in, k_out = layer.kept("in"), layer.kept("out")
    grid_in, grid_out = grid_length(k_in, d_in), grid_length(k_out, d_out)
    shapes = {"factor_in": (d_in,) if layer.diagonal_in else (d_in, d_in),
              "factor_out": (d_out,) if layer.diagonal_out else (d_out, d_out), "scale": (),
              "factor_weight": (), "scaling_weight": (),
              "basis_in": (d_in, k_in), "basis_out": (d_out, k_out), "eig_in": (grid_in,),
              "eig_out": (grid_out,), "basis_scale": (), "scaling": (grid_out, grid_in)}
    for side in ("in", "out"):
        if getattr(layer, f"diagonal_{side}"):
            del shapes[f"basis_{side}"]
    return shapes
