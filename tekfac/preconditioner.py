"""The Kronecker-factored preconditioner: the schedule and the loop over layers (docs/design.md §4).

:class:`Preconditioner` runs what :class:`tekfac.schedule.Schedule` says is due; the work lives
with its pieces: the batch statistics in :class:`tekfac.statistics.Statistics`, their output
gradients in the Fisher kind, the running estimates in :class:`tekfac.estimates.Estimates`, and
which rank does what in :class:`tekfac.distributed.WorkSplit`. Used alone it rewrites the
``.grad`` of the tracked layers, so any ``torch.optim`` optimizer can take the step;
:class:`tekfac.optim.KroneckerOptimizer` composes it with KL clipping and momentum SGD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from tekfac.capture import Capture
from tekfac.config import CurvatureConfig, check_choice, check_instance, saved_int
from tekfac.curvature import Curvature
from tekfac.distributed import Communicator, WorkSplit
from tekfac.estimates import Estimates
from tekfac.factors import FACTOR_KINDS
from tekfac.fisher import FISHER_KINDS, StepLoss, check_mask
from tekfac.guards import Faults, step_fault
from tekfac.layers import KroneckerLayer, describe_layers, plan_layers, unwrap
from tekfac.profiling import stage
from tekfac.records import LayerBatch
from tekfac.scaling import SCALING_KINDS
from tekfac.schedule import Schedule
from tekfac.sharding import check_sharding, local, sharded_parameters
from tekfac.state import LayerState
from tekfac.statistics import Statistics


class Preconditioner:
    """Kronecker-factored preconditioning of a model's Linear and Conv layers.

    Example (empirical Fisher, any torch optimizer)::

        pre = tekfac.Preconditioner(model, method="tekfac", fisher="empirical")
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss.backward(); pre.step(); opt.step()

    With the default MC Fisher call ``pre.backward(loss, outputs)`` instead of
    ``loss.backward()``. ``step()`` updates the statistics that are due and replaces the
    gradient of every tracked layer by ``(F̂ + damping)^{-1} ∇``; other parameters keep their
    gradient.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        method: ``"kfac"``, ``"ekfac"``, ``"tkfac"`` or ``"tekfac"``.
        exclude: modules or module-name patterns to leave to the first-order rule.
        seed: seed of the MC label sampler; default ``torch.initial_seed()``.
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any: the recorded
            output gradients are unscaled with its current scale (and the sampled backward is
            scaled by it, so that it does not underflow in float16).
        distributed_mode: ``"auto"``, ``"replicated"`` or ``"owner"``; see
            :class:`tekfac.optim.KroneckerOptimizer`.
        **options: :class:`tekfac.config.CurvatureConfig` fields (damping, fisher, loss, ...).
    """

    def __init__(self, model: nn.Module, method: str = "tekfac", *,
                 exclude: Iterable[nn.Module | str] = (), seed: int | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None,
                 distributed_mode: str = "auto", **options: object):
        self.config = c = CurvatureConfig.for_method(method, **options)
        self.factor_kind, self.scaling_kind = FACTOR_KINDS[c.factors], SCALING_KINDS[c.scaling]
        check_choice("distributed_mode", distributed_mode, ("auto", "replicated", "owner"))
        check_instance("grad_scaler", grad_scaler, torch.amp.GradScaler,
                       "a torch.amp.GradScaler or None", optional=True)
        check_instance("seed", seed, int, "an int or None", optional=True)
        self.model = unwrap(model)
        self.layers, self.untracked = plan_layers(self.model, exclude, c.max_factor_dim)
        check_sharding(self.model)
        for layer in self.layers:
            layer.rank = c.basis_rank
        self._by_module = {layer.module: layer for layer in self.layers}
        self.comm = Communicator()
        #: the names of the model's parameters that are sharded ``DTensor``s (FSDP2)
        self.sharded = sharded_parameters(self.model)
        owner = distributed_mode == "owner" or (distributed_mode == "auto" and bool(self.sharded))
        self.work = WorkSplit(self.comm, self.layers, owner, c.factor_dtype)
        self.fisher = FISHER_KINDS[c.fisher](c.loss, c.reduction,
                                             torch.initial_seed() if seed is None else seed,
                                             grad_scaler, self.comm.rank)
        self.statistics = Statistics(self.layers, self.factor_kind, self.scaling_kind,
                                     self.fisher, self.work)
        self.estimates = Estimates(self.layers, self.factor_kind, self.scaling_kind, self.work,
                                   self.warn_once)
        self.capture = Capture(self.model, self.layers, keep_edges=self.fisher.samples)
        self.schedule = Schedule(c, self.scaling_kind.refits)
        #: the step counter, and faults: (place, cause) → its first step and count (checkpointed)
        self.steps, self.faults = 0, Faults()
        self.loss = StepLoss(c.loss)
        #: while on, :meth:`backward` does nothing: the optimizer is evaluating the loss after
        #: its step (adaptive damping), under ``torch.no_grad``
        self.probing = False
        self.capture.recording = self.statistics_due

    @property
    def states(self) -> dict[KroneckerLayer, LayerState]:
        """Layer → its running statistics, basis and scaling (:class:`tekfac.state.LayerState`)."""
        return self.estimates.states

    @property
    def statistics_due(self) -> bool:
        """Whether the current step collects statistics (factors or a re-fitted scaling)."""
        return self.schedule.statistics(self.steps)

    def backward(self, loss: Tensor, outputs: Tensor, retain_graph: bool = False,
                 mask: Tensor | None = None) -> None:
        """Backpropagate ``loss``; on MC statistics steps first backpropagate a loss at labels
        sampled from ``outputs`` (the predictions ``loss`` was computed from: logits for the
        classification losses) to record the output gradients (docs/design.md §1); ``.grad``
        then holds the gradient of ``loss`` only. ``retain_graph`` keeps the graph for the
        quadratic step rule's products with the Jacobian of ``outputs``.

        ``mask`` (``torch.bool``, the shape of the loss's terms: ``outputs`` without the class
        axis for the categorical losses) marks the terms that enter ``loss``, e.g.
        ``labels != -100`` for ``ignore_index=-100``: the others get no sampled label, and
        neither they nor their count enter the curvature (docs/design.md §4b). For gradient
        accumulation call it once per micro-batch, each loss divided by the number of
        micro-batches. The micro-batch's statistics that this step's basis refresh leaves
        alone are reduced across ranks during ``loss.backward()`` (:meth:`update_curvature`
        waits for them)."""
        if self.probing:
            return
        c = self.config
        check_mask(c.loss, outputs, mask)
        self.loss.add(self.steps, loss, outputs, mask, self.capture.examples or 1)
        pending = self.capture.pending()
        if pending:
            self.fisher.record(outputs, pending, self.steps, self.capture.last_layer.d_out, mask)
        if self.fisher.samples and self.statistics_due:
            micro = self._collect({call.forward for call in pending})
            self.statistics.launch(micro, self.schedule, self.steps, self.states)
        loss.backward(retain_graph=retain_graph)

    def step(self) -> bool:
        """Update the statistics that are due and precondition the gradients in place; or,
        if :meth:`bad_step` finds a fault, skip the step (see :meth:`skip_step`), leaving the
        gradients as they are. Returns whether the step was taken."""
        grads = [p.grad for la in self.layers for p in la.params if p.grad is not None]
        cause = self.bad_step(grads)
        if cause is not None:
            self.skip_step(cause)
            return False
        self.update_curvature()
        for layer, (_, direction) in self.directions().items():
            for param, piece in zip(layer.params, layer.placed(direction)):
                param.grad.copy_(piece)
        return True

    def bad_step(self, grads: Sequence[Tensor]) -> str | None:
        """Why this step must be skipped whole, or ``None`` (:func:`tekfac.guards.step_fault`
        of the outputs and loss that :meth:`backward` saw and of ``grads``, each rank's own
        shards); the same on every rank of a process group, so that all skip together."""
        return step_fault(self.loss.bad, [local(g) for g in grads], self.comm.max)

    def skip_step(self, cause: str | None = None) -> None:
        """Skip this step whole, warning of ``cause``: no statistics, no eigendecomposition,
        the step counter unchanged (the next batch is taken as this step, with the same MC
        labels as if the bad batch had never been seen); everything the step recorded is
        dropped, reductions in flight awaited first."""
        if cause is not None:
            self.warn_once("model", cause, "skipping this step (parameters, momentum, "
                           "curvature and step counter unchanged)")
        self.loss.clear()
        self.work.clear(wait=True)
        self.capture.clear()
        self.fisher.end_step()

    def curvature_multiplier(self) -> float:
        """``c`` such that ``c·F̂`` is the curvature of the user's loss (docs/design.md §3),
        from this step's calls of :meth:`backward` (:meth:`tekfac.fisher.StepLoss.multiplier`)."""
        return self.loss.multiplier(self.steps, self.fisher, self.capture)

    def curvature(self, module: nn.Module) -> Curvature:
        """The curvature object of a tracked module (see :class:`tekfac.curvature.Curvature`)."""
        layer = self._by_module.get(module) if isinstance(module, nn.Module) else None
        if layer is None:
            tracked = ", ".join(la.name for la in self.layers)
            raise KeyError(f"{type(module).__name__} is not tracked by this optimizer; tracked "
                           f"layers: {tracked}")
        self.work.check_mine(layer)
        state = self.states[layer]
        multiplier = self.curvature_multiplier() if state.has_basis else 1.0  # else it raises
        return Curvature(layer, state, self.config, multiplier)

    def describe(self) -> str:
        """A table of the model's modules that have parameters of their own: which get a
        Kronecker block (and its shape) and which are left to the first-order step, and why
        (see :func:`tekfac.layers.describe_layers`)."""
        return describe_layers(self.model, self.layers, self.untracked, self.config.method)

    def __repr__(self) -> str:
        params = sum(la.num_params for la in self.layers)
        return (f"Preconditioner({self.config.method}, "
                f"{len(self.layers)} Kronecker layers ({params} parameters), "
                f"{len(self.untracked)} first-order modules; see describe())")

    def update_curvature(self) -> None:
        """Fold this step's statistics into the running estimates (docs/design.md §4.1–3) and
        advance the step counter. In a process group every rank must call it on every step."""
        c = self.config
        batch: dict[KroneckerLayer, LayerBatch] = {}
        skipped: set[KroneckerLayer] = set()
        if self.statistics_due:
            with stage("statistics"):
                batch = self._collect()
                if self.schedule.factors(self.steps):
                    reduced = self.work.reduced("factors", lambda: self.statistics.factors(batch))
                    skipped = self.estimates.fold_factors(reduced, c.stat_decay)
        self.estimates.refresh(skipped, self.schedule.bases(self.steps),
                               self.schedule.cheap_refresh(self.steps))
        if self.schedule.scaling(self.steps):
            with stage("scaling"):
                reduced = self.work.reduced(
                    "scaling", lambda: self.statistics.scaling(batch, self.states))
                self.estimates.fold_scaling(reduced, skipped, c.stat_decay)
        self.steps += 1
        self._clear()
        self.capture.recording = self.statistics_due
        self.fisher.end_step()
        self.loss.bad = None

    def directions(self, weight_decay: float | Mapping[Tensor, float] = 0.0
                   ) -> dict[KroneckerLayer, tuple[Tensor, Tensor]]:
        """``(∇, Δ)`` per layer that has a gradient: the ``(d_out, d_in)`` gradient matrix
        (plus ``wd·M``, with one ``weight_decay`` or one per parameter) and its
        preconditioned form ``(c·F̂ + damping)^{-1} ∇`` (``c``: :meth:`curvature_multiplier`);
        a layer without curvature yet has
        ``Δ = ∇``. In 'owner' mode each layer's owner preconditions it and broadcasts ``Δ``."""
        with stage("preconditioning"):
            grads = {la: g for la in self.layers
                     if (g := la.gradient_matrix(weight_decay)) is not None}
            multiplier = self.curvature_multiplier() if grads else 1.0
            return {la: (grads[la], d) for la, d in self.work.preconditioned(
                grads, lambda la: self.estimates.precondition(la, grads[la], self.config,
                                                              multiplier))}

    def _collect(self, forwards: set[int] | None = None) -> dict[KroneckerLayer, LayerBatch]:
        """This step's recorded examples per layer, of ``forwards`` only if given (nothing is
        unfolded yet). Records that are refused (see :meth:`tekfac.capture.Capture.batch`)
        drop the whole step's records before the error propagates, so that the next step,
        with the cause fixed, starts clean."""
        try:
            if forwards is None:
                self.fisher.check_recorded(self.capture.has_inputs)
            return self.capture.batches(forwards)
        except RuntimeError:
            self.skip_step()
            raise

    def _clear(self) -> None:
        """Forget this step's records and any reduction still in flight."""
        self.capture.clear()
        self.work.clear()

    def warn_once(self, where: KroneckerLayer | str, cause: str, consequence: str) -> None:
        """Record a fault at the current step; warn on its first occurrence per (layer or
        place, cause), count the later ones (:attr:`faults`)."""
        place = f"layer {where.name!r}" if isinstance(where, KroneckerLayer) else where
        self.faults(place, cause, consequence, self.steps, stacklevel=4)

    def state_dict(self, gather: bool | None = None) -> dict:
        """Step counter, MC seed, the method's factor and scaling kinds, faults (as JSON), and
        per-layer statistics/bases/scalings (:meth:`tekfac.estimates.Estimates.state_dict`:
        with owners, gathered from them by a collective unless ``gather`` is false; by
        default, gathered unless the model is sharded, whose ranks save their own layers).
        The MC sampler is a function of (seed, step), so no RNG state is needed."""
        gather = not self.sharded if gather is None else gather
        return {"steps": self.steps, "seed": self.fisher.seed, "factors": self.config.factors,
                "scaling": self.config.scaling, "faults": self.work.faults(self.faults),
                "layers": self.estimates.state_dict(gather)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if it does not fit this model or
        was saved by another method (the factor and scaling kinds must match; every other
        option, such as the damping, may change). A state of release 0.1.0 names no method
        and is taken as it is."""
        saved = state_dict.get("layers")
        if not isinstance(saved, dict):
            raise ValueError("Invalid state_dict: no 'layers' entry; was it saved by tekfac?")
        self.config.check_same_method(state_dict.get("factors"), state_dict.get("scaling"))
        faults = Faults()  # everything is read before anything changes
        faults.load_state_dict(state_dict.get("faults", []))
        steps, seed = saved_int(state_dict, "steps"), saved_int(state_dict, "seed")
        self.estimates.load_state_dict(saved)
        self.steps, self.fisher.seed, self.faults = steps, seed, faults
        self._clear()
        self.capture.recording = self.statistics_due

    def remove_hooks(self) -> None:
        """Detach from the model (no more statistics are recorded)."""
        self.capture.remove()
        self._clear()

