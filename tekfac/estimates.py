"""Every tracked layer's running estimates and the updates that change them (docs/design.md §4.1–3).

:class:`Estimates` holds one :class:`tekfac.state.LayerState` per layer and runs, over the
layers, the three updates of a step: the factors' average (:meth:`Estimates.fold_factors`),
the eigendecompositions (:meth:`Estimates.refresh_bases`, where the work split says) and the
re-fitted scaling's average (:meth:`Estimates.fold_scaling`). A non-finite statistic skips
that layer's update and a failed decomposition keeps the previous basis; each is reported
through ``warn(layer, cause, consequence)``. It also reads and writes the layers' part of
the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tekfac.config import CurvatureConfig
from tekfac.curvature import Curvature
from tekfac.distributed import Weighted, WorkSplit
from tekfac.factors import FactorKind, FactorStatistics
from tekfac.guards import non_finite
from tekfac.layers import KroneckerLayer
from tekfac.linalg import power_iteration_refresh, symmetric_eigh
from tekfac.profiling import stage
from tekfac.scaling import ScalingKind
from tekfac.state import LayerState
from tekfac.truncation import grid_length, truncate, with_remainder

#: ``warn(layer, cause, consequence)``: report a fault of one layer
Warn = Callable[[KroneckerLayer, str, str], None]


class Estimates:
    """The :class:`LayerState` of every tracked layer and their updates.

    Attributes:
        states: layer → its state. Where the work split gives a layer an owner, the other
            ranks keep nothing of it (an empty state, :meth:`WorkSplit.drop_unkept`).
        eigendecompositions: how many this rank has computed (its share of the work split).
    """

    def __init__(self, layers: Sequence[KroneckerLayer], factor_kind: FactorKind,
                 scaling_kind: ScalingKind, work: WorkSplit, warn: Warn):
        self.layers = list(layers)
        self.factor_kind, self.scaling_kind, self.work, self.warn = (
            factor_kind, scaling_kind, work, warn)
        self.states = {layer: LayerState() for layer in self.layers}
        self.eigendecompositions = 0

    def fold_factors(self, reduced: dict[KroneckerLayer, Weighted], decay: float
                     ) -> set[KroneckerLayer]:
        """Fold the globally averaged factors into their EMA (decay ``β``); returns the layers
        left unchanged. Each layer's statistics are dropped from ``reduced`` once finalised,
        and from the finalised ones once folded in, so that at most one extra copy of the
        factors is alive at a time."""
        finalized = {}
        for layer in list(reduced):
            tensors, total = reduced.pop(layer)
            if total > 0:
                finalized[layer] = self.factor_kind.finalize(FactorStatistics(*tensors))
        skipped = {la for la in self.layers if la not in finalized}
        skipped |= self._non_finite("statistics", finalized)
        for layer in list(finalized):
            stats = finalized.pop(layer)
            if layer not in skipped:
                self.states[layer].fold_factors(stats, decay)
        return skipped

    def refresh(self, skipped: set[KroneckerLayer], full: bool, cheap: bool) -> None:
        """The bases due this step, of the layers this rank keeps that have factors and were
        not ``skipped``: every one if ``full``, else those without a basis yet, and with
        ``cheap`` the others by a power iteration (docs/design.md §4.2)."""
        ready = [la for la in self.layers if la not in skipped and self.work.mine(la)
                 and self.states[la].factor_in is not None]
        refresh = [la for la in ready if full or not self.states[la].has_basis]
        refined = [la for la in ready if la not in refresh] if cheap else []
        if refresh or refined:
            with stage("eigendecomposition"):
                self.refresh_bases(refresh)
                self.refresh_bases(refined, from_previous=True)

    def refresh_bases(self, layers: list[KroneckerLayer], from_previous: bool = False) -> None:
        """Eigendecompose the factors of ``layers`` (where, is the work split's choice) and
        install each layer's basis; a failed decomposition keeps the previous basis. With
        ``from_previous``, refresh the previous basis by one power-iteration step and a QR
        instead (:func:`tekfac.linalg.power_iteration_refresh`). A diagonal side needs
        neither: its eigenvalues are its factor's entries, its basis the identity (``None``)."""
        if not layers:
            return
        dense = [(la, side) for la in layers for side in ("in", "out") if not _diagonal(la, side)]
        matrices = [getattr(self.states[la], f"factor_{side}") for la, side in dense]

        def compute(i: int) -> list[Tensor]:
            self.eigendecompositions += 1
            layer, side = dense[i]
            k, m = layer.kept(side), matrices[i]
            if from_previous:
                result = power_iteration_refresh(m, getattr(self.states[layer], f"basis_{side}"))
                if result is not None and k < len(m):
                    result = with_remainder(*result, m)
            else:
                result = symmetric_eigh(m, lambda: self.warn(
                    layer, "eigendecomposition failed in the factor dtype",
                    "retrying in float64 with jitter"))
                if result is not None:
                    result = truncate(*result, k)
            if result is None:  # tell every rank, through non-finite values
                return [m.new_full((grid_length(k, len(m)),), float("nan")),
                        m.new_full((len(m), k), float("nan"))]
            return list(result)

        results = self.work.eigendecompositions(matrices, compute,
                                                [la.kept(side) for la, side in dense])
        for layer in layers:
            state = self.states[layer]
            (eig_in, basis_in), (eig_out, basis_out) = (
                (getattr(state, f"factor_{side}").clamp(min=0), None) if _diagonal(layer, side)
                else next(results) for side in ("in", "out"))
            if not bool(torch.isfinite(eig_in).all() & torch.isfinite(eig_out).all()):
                self.warn(layer, "eigendecomposition failed", "keeping the previous basis")
                continue
            state.install_basis(eig_in, basis_in, eig_out, basis_out, self.scaling_kind)

    def fold_scaling(self, reduced: dict[KroneckerLayer, Weighted],
                     skipped: set[KroneckerLayer], decay: float) -> None:
        """Fold the globally averaged scaling estimates into their EMA (layers whose factor
        update was skipped keep their scaling)."""
        estimates = {layer: tensors for layer, (tensors, total) in reduced.items()
                     if total > 0 and layer not in skipped}
        bad = self._non_finite("corrected scaling", estimates)
        for layer, (estimate,) in estimates.items():
            if layer not in bad:
                self.states[layer].fold_scaling(estimate, decay)

    def precondition(self, layer: KroneckerLayer, grad: Tensor, config: CurvatureConfig,
                     multiplier: float) -> Tensor:
        """``(c·F̂ + damping)^{-1} ∇`` of ``layer`` (``c``: ``multiplier``), or ``∇`` itself
        before the layer has a scaling."""
        state = self.states[layer]
        if state.scaling is None:
            return grad
        return Curvature(layer, state, config, multiplier).precondition(grad)

    def _non_finite(self, what: str, tensors: dict[KroneckerLayer, Sequence[Tensor]]
                    ) -> set[KroneckerLayer]:
        """The layers with a NaN or Inf in any of their ``tensors``, each warned about once."""
        bad = non_finite(tensors)
        for layer in bad:
            self.warn(layer, f"non-finite {what}", "skipping this update")
        return set(bad)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, gather: bool = True) -> dict[str, dict[str, Tensor]]:
        """Layer name → its state (:meth:`LayerState.to_dict`). Where layers have owners,
        with ``gather`` a collective (call it on every rank) that gives every rank every
        layer's state from its owner; without, this rank's layers only (what
        ``torch.distributed.checkpoint`` saves from each rank)."""
        states = self.states
        if gather and self.work.owners is not None:
            held = self.work.owned_state(self.states)
            states = {la: LayerState(**entry) if not self.work.mine(la) else self.states[la]
                      for la, entry in zip(self.layers, held)}
        return {la.name: states[la].to_dict(la, self.work.dtype(la)) for la in self.layers
                if gather or self.work.mine(la)}

    def load_state_dict(self, saved: dict[str, dict[str, Tensor]]) -> None:
        """Restore :meth:`state_dict`: ``ValueError`` for a layer the optimizer does not
        track, a layer this rank keeps that is missing, or shapes other than
        :func:`tekfac.state.state_shapes`'. Each rank keeps what the work split says."""
        names = {layer.name for layer in self.layers}
        missing = [la.name for la in self.layers if self.work.mine(la) and la.name not in saved]
        if set(saved) - names or missing:
            raise ValueError(
                f"state_dict does not match the model: it has layers {sorted(saved)}, the "
                f"optimizer tracks {sorted(names)}" + (
                    f" and this rank keeps {missing}, which it lacks (a state dict of one rank "
                    "of a sharded model holds that rank's layers only: save and load with "
                    "torch.distributed.checkpoint)" if missing else ""))
        states = {}
        for layer in self.layers:
            state = LayerState()
            if layer.name in saved:
                state = LayerState.from_dict(saved[layer.name], layer, layer.module.weight.device)
                self.work.drop_unkept(layer, state)
            states[layer] = state
        self.states = states


def _diagonal(layer: KroneckerLayer, side: str) -> bool:
    """Whether the ``side`` (``"in"`` or ``"out"``) of ``layer``'s block is diagonal."""
    return layer.diagonal_in if side == "in" else layer.diagonal_out
