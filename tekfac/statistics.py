"""One step's batch statistics per layer, ready for the cross-rank mean (docs/design.md §4.1–3).

:class:`Statistics` turns a step's recorded calls (:class:`tekfac.records.LayerBatch`) into
the batch means the running estimates fold in: the factors and ``δ`` of the factor kind, and
the re-fitted scaling of the scaling kind in each layer's current basis. Each is returned as
:data:`tekfac.distributed.Weighted` (tensors and example count), padded by the work split so
that every rank reduces the same tensors in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from tekfac.distributed import Weighted, WorkSplit
from tekfac.factors import FactorKind
from tekfac.fisher import FisherKind
from tekfac.layers import KroneckerLayer
from tekfac.profiling import stage
from tekfac.records import Examples, LayerBatch
from tekfac.scaling import ScalingKind
from tekfac.schedule import Schedule
from tekfac.state import LayerState, state_shapes


class Statistics:
    """The batch statistics of a method's factor and scaling kinds.

    Args:
        layers: the tracked layers, in the same order on every rank.
        work: the work split, which pads and knows the statistics' dtype.
    """

    def __init__(self, layers: Sequence[KroneckerLayer], factor_kind: FactorKind,
                 scaling_kind: ScalingKind, fisher: FisherKind, work: WorkSplit):
        self.layers = list(layers)
        self.factor_kind, self.scaling_kind, self.fisher, self.work = (
            factor_kind, scaling_kind, fisher, work)

    def launch(self, micro: dict[KroneckerLayer, LayerBatch], schedule: Schedule, step: int,
               states: dict[KroneckerLayer, LayerState]) -> None:
        """Launch the cross-rank means of one micro-batch's statistics that step ``step``
        already knows: its factors, and its re-fitted scaling when no basis changes this step
        and every rank holds every basis."""
        if schedule.factors(step):
            with stage("statistics"):
                self.work.launch("factors", self.factors(micro))
        if schedule.scaling(step) and schedule.basis_kept(step) and self.work.knows_bases(states):
            with stage("scaling"):
                self.work.launch("scaling", self.scaling(micro, states))

    def factors(self, batch: dict[KroneckerLayer, LayerBatch]) -> dict[KroneckerLayer, Weighted]:
        """Layer → (batch-mean factors and δ, example count), padded by the work split. δ is
        only estimated when the scaling uses it (otherwise 1)."""
        kind, with_scale = self.factor_kind, self.scaling_kind.uses_scale

        def statistics(ex: Examples) -> list[Tensor]:
            factor_in, factor_out = kind.factors(ex)
            return [factor_in, factor_out,
                    kind.scale(ex) if with_scale else factor_in.new_ones(())]

        stats = {la: (self._mean(b, statistics), float(b.num_examples))
                 for la, b in batch.items()}
        return self.work.padded(stats, self.layers, lambda la: [
            self.work.zeros(la, *state_shapes(la)["factor_in"]),
            self.work.zeros(la, *state_shapes(la)["factor_out"]), self.work.zeros(la)])

    def scaling(self, batch: dict[KroneckerLayer, LayerBatch],
                states: dict[KroneckerLayer, LayerState]) -> dict[KroneckerLayer, Weighted]:
        """Layer → ([batch estimate of the re-fitted scaling in its current basis], count),
        for the layers with a basis (from their owners, :meth:`WorkSplit.bases`), padded by
        the work split."""
        stats, layers = {}, []
        for layer, basis_in, basis_out in self.work.bases(states):
            layers.append(layer)
            if layer in batch:
                def estimate(ex: Examples, u_in: Tensor | None = basis_in,
                             u_out: Tensor | None = basis_out) -> list[Tensor]:
                    return [self.scaling_kind.estimate(ex, u_in, u_out)]

                stats[layer] = (self._mean(batch[layer], estimate),
                                float(batch[layer].num_examples))
        return self.work.padded(stats, layers,
                                lambda la: [self.work.zeros(la, *state_shapes(la)["scaling"])])

    def _mean(self, batch: LayerBatch, fn: Callable[[Examples], Sequence[Tensor]]
              ) -> list[Tensor]:
        """:meth:`LayerBatch.mean` in the statistics' dtype, with ``g`` the per-example
        gradients of the unscaled loss (see :meth:`tekfac.fisher.FisherKind.grad_multiplier`)."""
        return batch.mean(fn, self.work.dtype(batch.layer),
                          self.fisher.grad_multiplier(batch.num_examples))
