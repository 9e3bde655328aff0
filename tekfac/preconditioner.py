"""The Kronecker-factored preconditioner: statistics, eigenbases, scalings (DESIGN.md §4.1–4).

:class:`Preconditioner` owns the per-layer state and orchestrates the pure kernels of
:mod:`tekfac.factors`, :mod:`tekfac.scaling` and :mod:`tekfac.damping`. Used alone it rewrites
the ``.grad`` of the supported layers, so any ``torch.optim`` optimizer can take the step;
:class:`tekfac.optim.KroneckerOptimizer` composes it with KL clipping and momentum SGD.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tekfac.capture import Capture, Examples, LayerBatch
from tekfac.config import CurvatureConfig
from tekfac.curvature import STATE_KEYS, Curvature, LayerState, state_shapes
from tekfac.distributed import Communicator, PendingMean
from tekfac.factors import FACTOR_KINDS, FactorStatistics
from tekfac.fisher import sample_targets, sampled_loss
from tekfac.layers import KroneckerLayer, is_supported
from tekfac.linalg import symmetric_eigh
from tekfac.scaling import carry_scaling, corrected_scaling, kronecker_scaling


def unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of ``DistributedDataParallel`` / ``DataParallel``, else ``model``."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def find_layers(model: nn.Module, exclude: Iterable[nn.Module | str] = ()) -> list[KroneckerLayer]:
    """The supported, trainable, not excluded layers of ``model`` in module order.

    ``exclude`` holds modules, or ``fnmatch`` patterns matched against qualified module names
    (``"classifier.*"``). Excluding a module excludes its sub-modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    exclude = list(exclude)
    for item in exclude:
        if not isinstance(item, (nn.Module, str)):
            raise TypeError(f"Invalid exclude entry {item!r}: expected a module or a name pattern")
    excluded_modules = {id(m) for e in exclude if isinstance(e, nn.Module) for m in e.modules()}
    patterns = [e for e in exclude if isinstance(e, str)]
    layers = []
    for name, module in model.named_modules():
        if not is_supported(module) or id(module) in excluded_modules:
            continue
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*")
               for p in patterns):
            continue
        if not all(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        layers.append(KroneckerLayer(name, module))
    return layers


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
        distributed_mode: ``"replicated"`` or ``"owner"``; see
            :class:`tekfac.optim.KroneckerOptimizer`.
        **options: :class:`tekfac.config.CurvatureConfig` fields (damping, fisher, loss, ...).
    """

    def __init__(self, model: nn.Module, method: str = "tekfac", *,
                 exclude: Iterable[nn.Module | str] = (), seed: int | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None,
                 distributed_mode: str = "replicated", **options: object):
        self.config = CurvatureConfig.for_method(method, **options)
        if distributed_mode not in ("replicated", "owner"):
            raise ValueError(f"Invalid distributed_mode: {distributed_mode!r}; expected "
                             "'replicated' or 'owner'")
        if distributed_mode == "owner" and self.config.scaling == "corrected":
            raise ValueError(
                "Invalid distributed_mode='owner' for EKFAC/TEKFAC: every rank needs every "
                "eigenbasis to rotate its own per-example gradients for the corrected scaling, "
                "so owner mode would save nothing; use 'replicated'")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"Invalid grad_scaler: expected a torch.amp.GradScaler or None, got "
                            f"{type(grad_scaler).__name__}")
        self.grad_scaler = grad_scaler
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"Invalid seed: {seed!r}; expected an int or None")
        self.model = unwrap(model)
        self.layers = find_layers(self.model, exclude)
        self.states = {layer: LayerState() for layer in self.layers}
        self._by_module = {layer.module: layer for layer in self.layers}
        self.capture = Capture(self.model, self.layers, keep_edges=self.config.fisher == "mc")
        self.steps = 0
        self.seed = torch.initial_seed() if seed is None else seed
        self.comm = Communicator()
        self.eigendecompositions = 0  # computed by this rank (the work split's share)
        #: layer → the rank that keeps its basis and preconditions it ('owner' mode only)
        self.owners = dict(zip(self.layers, self.comm.assign(
            [float(la.d_in) ** 3 + float(la.d_out) ** 3 for la in self.layers]))) \
            if distributed_mode == "owner" and self.comm.active else None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._micro_batches = 0
        self._sampled = False
        #: 'factors'/'corrected' → the reductions launched by this step's backward calls
        self._in_flight: dict[str, list[tuple[list[KroneckerLayer], PendingMean]]] = {
            "factors": [], "corrected": []}
        self._warned: set[str] = set()
        self.capture.recording = self.statistics_due

    # ---------------------------------------------------------------- schedule
    def _due(self, freq: int) -> bool:
        return self.steps % freq == 0

    @property
    def statistics_due(self) -> bool:
        """Whether the current step collects statistics (factors or corrected scaling)."""
        c = self.config
        return self._due(c.cov_update_freq) or (
            c.scaling == "corrected" and self._due(c.scale_update_freq))

    # ---------------------------------------------------------------- user-facing calls
    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """Backpropagate ``loss``; on MC statistics steps first backpropagate a loss at labels
        sampled from ``outputs`` to record the output gradients (DESIGN.md §1).

        Afterwards ``.grad`` holds the gradient of ``loss`` only. ``outputs`` are the model's
        predictions that ``loss`` was computed from (logits for the classification losses).
        For gradient accumulation call it once per micro-batch, with each micro-batch's loss
        divided by the number of micro-batches (so that the sum is the full-batch mean).

        The statistics of the micro-batch that do not depend on this step's basis refresh
        (the factors, and the corrected scaling when the basis stays) are computed between
        the two backward passes and their cross-rank reduction is launched there, so that it
        overlaps ``loss.backward()``; :meth:`update_curvature` waits for it.
        """
        c = self.config
        pending = self.capture.pending() if c.fisher == "mc" else []
        if pending:
            targets = sample_targets(c.loss, outputs, self._rng(outputs.device))
            sampled = sampled_loss(c.loss, outputs, targets, c.reduction) * self._loss_scale()
            if c.reduction == "mean":  # per-example gradients of this micro-batch
                sampled = sampled * outputs.shape[0]
            grads = torch.autograd.grad(sampled, [call.edge for call in pending],
                                        retain_graph=True, allow_unused=True)
            for call, grad in zip(pending, grads):
                call.edge = None
                if grad is not None:
                    call.receive(grad)
            self._sampled = True
        if c.fisher == "mc" and self.statistics_due:
            forwards = {call.forward for call in pending}
            micro = {la: b for la in self.layers
                     if (b := self.capture.batch(la, forwards)) is not None}
            if self._due(c.cov_update_freq):
                self._launch("factors", micro)
            if c.scaling == "corrected" and self._due(c.scale_update_freq) and self._basis_kept():
                self._launch("corrected", micro)
        loss.backward()

    def step(self) -> None:
        """Update the statistics that are due and precondition the gradients in place."""
        self.update_curvature()
        for layer, (_, direction) in self.directions().items():
            for param, piece in zip(layer.params, layer.split(direction)):
                param.grad.copy_(piece)

    def curvature(self, module: nn.Module) -> Curvature:
        """The curvature object of a tracked module (see :class:`tekfac.curvature.Curvature`)."""
        layer = self._by_module.get(module) if isinstance(module, nn.Module) else None
        if layer is None:
            tracked = ", ".join(la.name for la in self.layers)
            raise KeyError(f"{type(module).__name__} is not tracked by this optimizer; tracked "
                           f"layers: {tracked}")
        if self.owners is not None and self.owners[layer] != self.comm.rank:
            raise RuntimeError(f"Layer {layer.name!r} is held by rank {self.owners[layer]} "
                               "(distributed_mode='owner'); ask that rank")
        return Curvature(layer, self.states[layer], self.config)

    def _mine(self, layer: KroneckerLayer) -> bool:
        """Whether this rank keeps the layer's basis (always, unless in 'owner' mode)."""
        return self.owners is None or self.owners[layer] == self.comm.rank

    # ---------------------------------------------------------------- the update
    def update_curvature(self) -> None:
        """Fold this step's statistics into the running estimates (DESIGN.md §4.1–3) and
        advance the step counter. In a process group every rank must call it on every step."""
        c = self.config
        batch, skipped = {}, set()
        if self.statistics_due:
            batch = self._collect()
            if self._due(c.cov_update_freq):
                skipped = self._update_factors(self._reduced("factors", batch))
        refresh = [la for la in self.layers if la not in skipped and self._mine(la)
                   and self.states[la].factor_in is not None
                   and (self._due(c.eigen_update_freq) or self.states[la].basis_in is None)]
        if refresh:
            self._update_bases(refresh)
        if c.scaling == "corrected" and self._due(c.scale_update_freq):
            self._update_corrected(self._reduced("corrected", batch), skipped)
        self.steps += 1
        self._clear()
        self.capture.recording = self.statistics_due
        self._sampled = False
        self._micro_batches = 0

    def directions(self, weight_decay: float = 0.0
                   ) -> dict[KroneckerLayer, tuple[Tensor, Tensor]]:
        """``(∇, Δ)`` per layer that has a gradient: the ``(d_out, d_in)`` gradient matrix
        (plus ``weight_decay·M``) and its preconditioned form ``(F̂ + damping)^{-1} ∇``; a
        layer without curvature yet has ``Δ = ∇``. In 'owner' mode each layer's owner
        preconditions it and broadcasts ``Δ``."""
        grads = {}
        for layer in self.layers:
            grad = layer.gradient_matrix(weight_decay)
            if grad is not None:
                grads[layer] = grad

        def precondition(layer: KroneckerLayer) -> Tensor:
            state = self.states[layer]
            if state.scaling is None:
                return grads[layer]
            return Curvature(layer, state, self.config).precondition(grads[layer])

        layers = list(grads)
        if self.owners is None:
            return {la: (grads[la], precondition(la)) for la in layers}
        shared = self.comm.share([self.owners[la] for la in layers],
                                 lambda i: [precondition(layers[i])],
                                 [[grads[la]] for la in layers])
        return {la: (grads[la], d) for la, (d,) in zip(layers, shared)}

    def _collect(self) -> dict[KroneckerLayer, LayerBatch]:
        """This step's recorded examples per layer (nothing is unfolded yet)."""
        cap = self.capture
        if self.config.fisher == "mc" and cap.has_inputs and not self._sampled:
            raise RuntimeError(
                "fisher='mc' needs the sampled backward on statistics steps: replace "
                "loss.backward() by optimizer.backward(loss, outputs) (or pass fisher='empirical')")
        batches = {layer: cap.batch(layer) for layer in cap.calls}
        return {layer: b for layer, b in batches.items() if b is not None}

    def _batch_mean(self, batch: LayerBatch, fn: Callable[[Examples], Sequence[Tensor]]
                    ) -> list[Tensor]:
        """The batch mean of the per-forward means ``fn(examples)``, with ``g`` per example:
        the user's batch-mean loss gradient times ``N`` (the MC pass is per example already),
        divided by the GradScaler's scale."""
        layer = batch.layer
        dtype = self.config.factor_dtype or layer.module.weight.dtype
        n = batch.num_examples
        per_example = n if self.config.fisher == "empirical" and self.config.reduction == "mean" \
            else 1
        total: list[Tensor] | None = None
        for examples in batch.examples(dtype, per_example / self._loss_scale()):
            part = [t * (examples.n / n) for t in fn(examples)]
            total = part if total is None else [x + y for x, y in zip(total, part)]
        return total  # type: ignore[return-value]

    # ---------------------------------------------------------------- statistics, reduced
    def _basis_kept(self) -> bool:
        """Whether no layer's basis will be refreshed this step, so that the corrected scaling
        can be estimated in the current bases before :meth:`update_curvature`."""
        return not self._due(self.config.eigen_update_freq) and all(
            self.states[la].basis_in is not None for la in self.layers)

    def _launch(self, kind: str, batch: dict[KroneckerLayer, LayerBatch]) -> None:
        """Compute the ``kind`` statistics of ``batch`` and launch their cross-rank mean."""
        stats = self._factor_statistics(batch) if kind == "factors" \
            else self._corrected_statistics(batch)
        layers = list(stats)
        self._in_flight[kind].append(
            (layers, self.comm.weighted_mean_async([stats[la] for la in layers])))

    def _reduced(self, kind: str, batch: dict[KroneckerLayer, LayerBatch]
                 ) -> dict[KroneckerLayer, tuple[list[Tensor], float]]:
        """Layer → (global mean of its ``kind`` statistics, global example count) for this
        step: the reductions launched by :meth:`backward` (micro-batches combined by their
        counts), or, if none was, those of ``batch`` computed and reduced now."""
        if not self._in_flight[kind]:
            self._launch(kind, batch)
        parts = [dict(zip(layers, pending.wait())) for layers, pending in self._in_flight[kind]]
        self._in_flight[kind].clear()
        if len(parts) == 1:
            return parts[0]
        combined = {}
        for layer in self.layers:
            got = [part[layer] for part in parts if layer in part]
            if not got:
                continue
            total = sum(weight for _, weight in got)
            share = [weight / total if total else 0.0 for _, weight in got]
            combined[layer] = ([sum(ts[i] * w for (ts, _), w in zip(got, share))
                                for i in range(len(got[0][0]))], total)
        return combined

    def _factor_statistics(self, batch: dict[KroneckerLayer, LayerBatch]
                           ) -> dict[KroneckerLayer, tuple[list[Tensor], float]]:
        """Layer → (batch-mean factor statistics, example count). In a process group every
        layer is present (zeros of weight 0 where this rank has no examples), so that every
        rank reduces the same tensors in the same order."""
        kind = FACTOR_KINDS[self.config.factors]
        with_scale = self.config.scaling == "kronecker"  # a corrected scaling replaces δ

        def statistics(ex: Examples) -> FactorStatistics:
            return kind.batch(ex, with_scale)

        stats = {}
        for layer in self.layers:
            if layer in batch:
                stats[layer] = (self._batch_mean(batch[layer], statistics),
                                float(batch[layer].num_examples))
            elif self.comm.active:
                d_in, d_out = layer.d_in, layer.d_out
                stats[layer] = ([self._zeros(layer, d_in, d_in), self._zeros(layer, d_out, d_out),
                                 self._zeros(layer)], 0.0)
        return stats

    def _corrected_statistics(self, batch: dict[KroneckerLayer, LayerBatch]
                              ) -> dict[KroneckerLayer, tuple[list[Tensor], float]]:
        """Layer → ([batch-mean corrected second moments in its current basis], count), for
        the layers with a basis (every one of them in a process group, as above)."""
        stats = {}
        for layer in self.layers:
            state = self.states[layer]
            if state.basis_in is None:
                continue
            if layer in batch:
                def estimate(ex: Examples, s: LayerState = state) -> list[Tensor]:
                    return [corrected_scaling(ex, s.basis_in, s.basis_out)]

                stats[layer] = (self._batch_mean(batch[layer], estimate),
                                float(batch[layer].num_examples))
            elif self.comm.active:
                stats[layer] = ([self._zeros(layer, layer.d_out, layer.d_in)], 0.0)
        return stats

    def _update_factors(self, reduced: dict[KroneckerLayer, tuple[list[Tensor], float]]
                        ) -> set[KroneckerLayer]:
        """EMA of the globally averaged factors; returns the layers left unchanged. Each
        layer's statistics are dropped from ``reduced`` once finalised, and from the
        finalised ones once folded in, so that at most one extra copy of the factors is
        alive at a time."""
        kind = FACTOR_KINDS[self.config.factors]
        finalized = {}
        for layer in list(reduced):
            tensors, total = reduced.pop(layer)
            if total > 0:
                finalized[layer] = kind.finalize(FactorStatistics(*tensors))
        skipped = {la for la in self.layers if la not in finalized}
        skipped |= self._non_finite("statistics", finalized)
        for layer in list(finalized):
            stats = finalized.pop(layer)
            if layer in skipped:
                continue
            state = self.states[layer]
            first = state.factor_in is None
            state.factor_in = stats[0] if first else self._ema(state.factor_in, stats[0])
            state.factor_out = stats[1] if first else self._ema(state.factor_out, stats[1])
            state.scale = stats[2] if first else self._ema(state.scale, stats[2])
        return skipped

    def _update_bases(self, layers: list[KroneckerLayer]) -> None:
        """Eigendecompose both factors of ``layers``: in a process group split over ranks by
        cost ``d³`` and shared; otherwise (a single process, or 'owner' mode, where each rank
        has its own layers) one layer at a time, so that a layer's previous basis is freed
        before the next one is computed."""
        matrices = [m for la in layers for m in (self.states[la].factor_in,
                                                 self.states[la].factor_out)]

        def compute(i: int) -> list[Tensor]:
            self.eigendecompositions += 1
            result = symmetric_eigh(matrices[i])
            if result is None:  # tell every rank, through non-finite values
                m = matrices[i]
                return [m.new_full((len(m),), float("nan")), m.new_full(m.shape, float("nan"))]
            return list(result)

        if self.owners is None and self.comm.active:  # every rank gets every basis
            owners = self.comm.assign([float(m.shape[0]) ** 3 for m in matrices])
            templates = [[m.new_empty(len(m)), m.new_empty(m.shape)] for m in matrices]
            results = iter(self.comm.share(owners, compute, templates))
        else:  # computed lazily, as each layer installs its basis
            results = (compute(i) for i in range(len(matrices)))
        for layer in layers:
            self._install_basis(layer, *next(results), *next(results))

    def _install_basis(self, layer: KroneckerLayer, eig_in: Tensor, basis_in: Tensor,
                       eig_out: Tensor, basis_out: Tensor) -> None:
        """Make a fresh eigendecomposition the layer's basis, and its scaling follow it (a
        failed one, with non-finite values, keeps the previous basis)."""
        if not bool(torch.isfinite(eig_in).all() & torch.isfinite(eig_out).all()):
            self.warn_once(layer, "eigendecomposition failed; keeping the previous basis")
            return
        state = self.states[layer]
        if self.config.scaling == "kronecker":
            state.scaling = kronecker_scaling(eig_in, eig_out, state.scale)
        elif state.scaling is not None:
            state.scaling = carry_scaling(state.scaling, state.basis_in, state.basis_out,
                                          basis_in, basis_out)
        state.basis_in, state.basis_out = basis_in, basis_out
        state.eig_in, state.eig_out, state.basis_scale = eig_in, eig_out, state.scale

    def _update_corrected(self, reduced: dict[KroneckerLayer, tuple[list[Tensor], float]],
                          skipped: set[KroneckerLayer]) -> None:
        """EMA of the globally averaged corrected second moments (layers whose factor update
        was skipped keep their scaling)."""
        estimates = {layer: tensors for layer, (tensors, total) in reduced.items()
                     if total > 0 and layer not in skipped}
        bad = self._non_finite("corrected scaling", estimates)
        for layer, (estimate,) in estimates.items():
            if layer in bad:
                continue
            state = self.states[layer]
            state.scaling = estimate if state.scaling is None else self._ema(state.scaling,
                                                                              estimate)

    def _clear(self) -> None:
        """Forget this step's records and any reduction still in flight."""
        self.capture.clear()
        for pending in self._in_flight.values():
            pending.clear()

    def _zeros(self, layer: KroneckerLayer, *shape: int) -> Tensor:
        weight = layer.module.weight
        return torch.zeros(shape, dtype=self.config.factor_dtype or weight.dtype,
                           device=weight.device)

    def _ema(self, old: Tensor, new: Tensor) -> Tensor:
        return torch.lerp(new, old, self.config.stat_decay)

    def _non_finite(self, what: str, tensors: dict[KroneckerLayer, Sequence[Tensor]]
                    ) -> set[KroneckerLayer]:
        """The layers with a NaN or Inf in any of their ``tensors``, each warned about once (in
        the order of ``tensors``); one host synchronisation for all layers together (the
        layers' flags are gathered on the first layer's device)."""
        if not tensors:
            return set()
        flags = [torch.stack([torch.isfinite(t).all() for t in ts]).all()
                 for ts in tensors.values()]
        finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        bad = [layer for layer, ok in zip(tensors, finite) if not ok]
        for layer in bad:
            self.warn_once(layer, f"non-finite {what}; skipping this update")
        return set(bad)

    def warn_once(self, where: KroneckerLayer | str, message: str) -> None:
        """Warn once per (layer or place, message)."""
        name = where.name if isinstance(where, KroneckerLayer) else where
        key = f"{name}: {message}"
        if key not in self._warned:
            self._warned.add(key)
            what = f"layer {name!r}" if isinstance(where, KroneckerLayer) else name
            warnings.warn(f"tekfac: {what}: {message}", RuntimeWarning, stacklevel=3)

    def _loss_scale(self) -> float:
        """The GradScaler's current scale (the one the last backward used), else 1."""
        scaler = self.grad_scaler
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0

    def _rng(self, device: torch.device) -> torch.Generator:
        """The MC sampler, seeded from (seed, step, rank, micro-batch): a pure function of the
        step counter, so checkpoints need no RNG state and ranks draw different labels."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        entropy = [self.seed, self.steps, self.comm.rank, self._micro_batches]
        gen.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
                            >> np.uint64(1)))
        self._micro_batches += 1
        return gen

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Step counter, MC seed and per-layer statistics/bases/scalings (keyed by layer
        name). The MC sampler is a function of (seed, step), so no RNG state is needed.
        In 'owner' mode this is a collective (call it on every rank): each basis comes from
        its owner."""
        layers = {layer.name: self.states[layer].to_dict() for layer in self.layers}
        if self.owners is not None:
            for layer, held in zip(self.layers, self._owned_bases()):
                layers[layer.name].update(held)
        return {"steps": self.steps, "seed": self.seed, "layers": layers}

    def _owned_bases(self) -> list[dict[str, Tensor]]:
        """Every layer's basis fields, broadcast from its owner (empty if it has none)."""
        keys = ("basis_in", "basis_out", "eig_in", "eig_out", "basis_scale", "scaling")
        templates = [[self._zeros(la, *state_shapes(la.d_in, la.d_out)[k]).fill_(float("nan"))
                      for k in keys] for la in self.layers]

        def held(i: int) -> list[Tensor]:
            state = self.states[self.layers[i]]
            if state.basis_in is None:
                return templates[i]
            return [getattr(state, k) for k in keys]

        shared = self.comm.share([self.owners[la] for la in self.layers], held, templates)
        return [dict(zip(keys, values)) if bool(torch.isfinite(values[0]).all()) else {}
                for values in shared]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if it does not fit this model."""
        saved = state_dict.get("layers")
        if not isinstance(saved, dict):
            raise ValueError("Invalid state_dict: no 'layers' entry; was it saved by tekfac?")
        names = [layer.name for layer in self.layers]
        if sorted(saved) != sorted(names):
            raise ValueError(f"state_dict does not match the model: it has layers "
                             f"{sorted(saved)}, the optimizer tracks {sorted(names)}")
        new_states = {}
        for layer in self.layers:
            entry = saved[layer.name]
            unknown = set(entry) - set(STATE_KEYS)
            if unknown:
                raise ValueError(f"state_dict layer {layer.name!r} has unknown keys {unknown}")
            state = LayerState(**{k: v.to(layer.module.weight.device) for k, v in entry.items()})
            _check_shapes(layer, state)
            if not self._mine(layer):  # 'owner' mode: only the owner keeps the basis
                state.basis_in = state.basis_out = state.eig_in = state.eig_out = None
                state.basis_scale = state.scaling = None
            new_states[layer] = state
        self.steps, self.seed = int(state_dict["steps"]), int(state_dict["seed"])
        self.states = new_states
        self._clear()
        self.capture.recording = self.statistics_due

    def remove_hooks(self) -> None:
        """Detach from the model (no more statistics are recorded)."""
        self.capture.remove()
        self._clear()


def _check_shapes(layer: KroneckerLayer, state: LayerState) -> None:
    for key, shape in state_shapes(layer.d_in, layer.d_out).items():
        value = getattr(state, key)
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"state_dict does not match layer {layer.name!r}: {key} has shape "
                             f"{tuple(value.shape)}, expected {shape}")
