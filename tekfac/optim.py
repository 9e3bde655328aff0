"""The optimizer: preconditioning + KL clipping + momentum SGD, or the quadratic-model step
(docs/design.md §4.4–7).

:class:`KroneckerOptimizer` is one ``torch.optim.Optimizer`` composed from a
:class:`tekfac.Preconditioner`; :class:`KFAC`, :class:`EKFAC`, :class:`TKFAC` and
:class:`TEKFAC` are its four named configurations (docs/design.md §2).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from tekfac.config import check_choice, check_instance, check_number
from tekfac.curvature import Curvature
from tekfac.damping_adaptation import DampingAdaptation, reduction_ratio
from tekfac.layers import KroneckerLayer
from tekfac.preconditioner import Preconditioner
from tekfac.profiling import stage
from tekfac.quadratic import curvature_gram, inner_products, model_change, solve, weighted_grams
from tekfac.sharding import full

_CURVATURE_KEY = "curvature"
_DAMPING_KEY = "damping"
_FORMAT_KEY = "format"
#: Where format 3 keeps the optimizer-wide state: in ``param_groups[0]``, which
#: ``torch.distributed.checkpoint.state_dict`` keeps (it drops other top-level keys).
_TEKFAC_KEY = "tekfac"
#: The checkpoint format: 3 since issue #27 (the curvature in ``param_groups[0]["tekfac"]``,
#: every parameter's state complete, for torch.distributed.checkpoint); 2 since issue #32
#: (momentum buffers hold the previous update, the statistics' average weights, the
#: curvature of the loss as reduced), with the curvature at the top level; 1 before.
FORMAT = 3

#: The options a param group may set (the constructor's values fill in the others). KL
#: clipping and the curvature options belong to the whole model.
GROUP_OPTIONS = ("lr", "momentum", "nesterov", "weight_decay", "decoupled_weight_decay",
                 "kl_clip_lr")
#: How the step's size is chosen: ``"fixed"`` (the rate and momentum given, KL-clipped) or
#: ``"quadratic"`` (the quadratic model's rate and momentum, docs/design.md §4.7).
STEP_RULES = ("fixed", "quadratic")


class KroneckerOptimizer(torch.optim.Optimizer):
    """Momentum SGD on Kronecker-factored natural gradients.

    Per step, for every tracked layer with gradient matrix ``∇ = [dW | db]`` (plus
    ``wd·M`` for the parameters whose decay is coupled, each with its group's ``wd``):

    .. math::
        Δ = (F̂ + \\text{damping})^{-1} ∇, \\qquad
        ν = \\min\\Big(1, \\sqrt{\\frac{κ}{\\sum_p \\text{lr}_p^2 ⟨Δ_p, ∇_p⟩}}\\Big),

    the sum running over the tracked parameters ``p`` (weights and biases), ``lr_p`` the
    *reference* rate of ``p``'s group, its ``kl_clip_lr`` (by default the group's ``lr`` when
    the group was made): one ν for the whole model, ``lr² Σ_l ⟨Δ_l, ∇_l⟩`` with one group at
    its starting rate. Then each parameter takes its group's momentum step on the update,
    ``u ← μ u + lr·νΔ``, ``θ ← θ - u`` (``θ ← θ - (lr·νΔ + μ u)`` with Nesterov; SGD's rule at
    a constant rate, docs/design.md §4.6) at the *current* ``lr``: the trust region is
    set at the reference rate and the current rate scales the clipped step, so a warm-up or
    decay acts on the tracked layers even while the clip binds, whether a scheduler or a
    hand-written loop sets ``lr`` (docs/design.md §4.5). The last ν is
    :attr:`kl_factor`. Every other parameter (BatchNorm,
    LayerNorm, excluded layers, ...) takes the same momentum step, with its group's options,
    on its raw gradient. Decoupled weight decay multiplies a parameter by
    ``1 - lr·weight_decay`` before the step (AdamW style).

    With ``step_rule="quadratic"`` the step is Martens & Grosse's (2015, §7) instead:
    ``u ← lr·(αΔ + μu)``, ``θ ← θ − u`` for every parameter (``Δ`` the raw gradient, plus
    coupled decay, for the untracked ones), with ``(α, μ)`` the minimiser of the quadratic
    model of the loss (plus the coupled decay's ``η‖θ‖²/2``) along ``Δ`` and ``u``, damped by
    each block's damping, with the loss's exact curvature ``Jᵀ F_f J`` (docs/design.md §4.7):
    one ``(α, μ)`` for the whole model, :attr:`step_coefficients`; ``lr`` multiplies the
    chosen step (default 1, a schedule on it acts as usual), the KL clip is off. It needs
    ``optimizer.backward(loss, outputs)`` for every backward (with either Fisher), which keeps
    the graph of ``outputs`` until the step: about three more backward passes per step.

    With ``fisher="mc"`` (default) use ``optimizer.backward(loss, outputs)`` instead of
    ``loss.backward()``; with ``fisher="empirical"`` the ordinary loop works unchanged.

    Args:
        model: the model to train (a ``DistributedDataParallel`` wrapper is accepted); its
            Kronecker blocks and hooks come from it whatever ``params`` says.
        method: ``"kfac"``, ``"ekfac"``, ``"tkfac"`` or ``"tekfac"``.
        params: ``torch.optim``-style param groups, dicts with ``"params"`` and any of
            :data:`GROUP_OPTIONS` (e.g. decay and no-decay groups); default one group with
            every trainable parameter. Every trainable parameter of the model must be in
            exactly one group. A layer's weight and bias in different groups still share one
            Kronecker block and direction; each then takes its own group's step.
        lr: learning rate (≥ 0); default 0.01, and 1 (a multiplier of the chosen step) with
            ``step_rule="quadratic"``.
        momentum: momentum factor μ in ``[0, 1)``. With ``step_rule="quadratic"`` any value
            above 0 lets the quadratic model choose μ each step; 0 keeps no momentum (α only).
            Every group then needs the same choice.
        nesterov: use Nesterov momentum (needs ``momentum > 0``; not with the quadratic rule).
        weight_decay: L2 coefficient (≥ 0).
        decoupled_weight_decay: apply the decay to the parameters directly instead of adding
            it to the gradient before preconditioning.
        kl_clip: κ of the KL clipping (Ba et al. 2017), or ``None`` to turn it off; one
            bound for the whole model, not a group option. Default ``"auto"``: 1e-3, and
            off with ``step_rule="quadratic"`` (which refuses a κ: the model sets the step).
        step_rule: ``"fixed"`` (default: the rate and momentum given) or ``"quadratic"``
            (the quadratic model's, above).
        kl_clip_lr: the learning rate at which ``kl_clip`` bounds the step (the peak of a
            schedule); default ``None``: each group's ``lr`` when the group is made. A group
            option, kept in ``param_groups`` (and so in checkpoints); set it to the schedule's
            peak when the optimizer is built at another rate (``OneCycleLR``'s ``max_lr``).
        exclude: modules or module-name patterns left to the first-order rule.
        seed: seed of the MC label sampler; default ``torch.initial_seed()``.
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop, so that the
            recorded output gradients are unscaled (use ``scaler.step(optimizer)`` as usual).
        damping_adaptive: adapt the damping by Levenberg–Marquardt (docs/design.md §3,
            :mod:`tekfac.damping_adaptation`): ``True`` with the default schedule (every 5
            steps, factor ``(19/20)^5``), or a :class:`~tekfac.damping_adaptation.
            DampingAdaptation`. ``damping`` is then the starting value and ``damping_floor``
            its lower bound. Every ``step`` must get a closure that computes the loss and
            calls ``optimizer.backward(loss, outputs)`` (not ``loss.backward()``); on
            adaptation steps it is called a second time after the step, under
            ``torch.no_grad``, to measure the loss change (one extra forward pass; buffers
            such as BatchNorm's running statistics and the RNG state are as if it had not
            run, so dropout draws the same masks), after which ``.grad`` is what that closure
            left. The current value is :attr:`damping`, the last ratio
            :attr:`reduction_ratio`.
        distributed_mode: in a process group, ``"replicated"`` (every rank keeps every
            layer's curvature; the decompositions are split over ranks and broadcast),
            ``"owner"`` (each layer's factors, basis and scaling live on one rank, which
            receives the layer's statistics by a reduce, preconditions it and broadcasts the
            direction: per-rank curvature memory about total / ranks, a broadcast per step;
            EKFAC/TEKFAC also broadcast the bases on re-fit steps), or ``"auto"`` (default:
            ``"owner"`` for a model sharded by FSDP2's ``fully_shard``, else
            ``"replicated"``). See docs/design.md §5 for sharded models.
        damping, damping_type, damping_floor, fisher, loss, reduction, stat_decay,
        cov_update_freq, eigen_update_freq, scale_update_freq, factor_dtype: see
            :class:`tekfac.config.CurvatureConfig`. ``scale_update_freq`` is ignored by KFAC
            and TKFAC.
    """

    def __init__(self, model: nn.Module, method: str = "tekfac", *,
                 params: Iterable[Tensor] | Iterable[dict] | None = None,
                 lr: float | None = None, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 kl_clip: float | str | None = "auto", kl_clip_lr: float | None = None,
                 step_rule: str = "fixed", exclude: Iterable[nn.Module | str] = (),
                 seed: int | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None,
                 damping_adaptive: bool | DampingAdaptation = False,
                 distributed_mode: str = "auto", **curvature_options: object):
        check_choice("step_rule", step_rule, STEP_RULES)
        #: ``"fixed"`` or ``"quadratic"`` (see the class docstring)
        self.step_rule = step_rule
        quadratic = step_rule == "quadratic"
        #: the damping's Levenberg–Marquardt schedule, ``None`` when it is fixed
        self.damping_adaptation = _adaptation(damping_adaptive, grad_scaler)
        if lr is None:
            lr = 1.0 if quadratic else 0.01
        if kl_clip == "auto":
            kl_clip = None if quadratic else 1e-3
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, kl_clip_lr=kl_clip_lr)
        _check_options(defaults, step_rule=step_rule)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, 0.0, low_open=True)
            if quadratic:
                raise ValueError(f"Invalid kl_clip={kl_clip!r} with step_rule='quadratic': the "
                                 "quadratic model chooses the step's size, which a KL bound "
                                 "would override; leave kl_clip at its default (off)")
        self.preconditioner = Preconditioner(model, method, exclude=exclude, seed=seed,
                                             grad_scaler=grad_scaler,
                                             distributed_mode=distributed_mode,
                                             **curvature_options)
        if params is None:
            params = [p for p in self.preconditioner.model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("Invalid model: it has no trainable parameters")
        try:
            _check_sharded_options(self.preconditioner.sharded, quadratic, self.damping_adaptation)
            super().__init__(params, {**defaults, "kl_clip": kl_clip})
            self._check_every_parameter_grouped()
            self._add_state_entries()
        except (TypeError, ValueError):
            self.preconditioner.remove_hooks()
            raise
        self.method = method.lower()
        #: ν of the last step taken, a 0-dim tensor on the parameters' device (reading it
        #: synchronises); ``None`` before the first step or without clipping.
        self.kl_factor: Tensor | None = None
        #: ρ of the last damping adaptation (``None`` before the first, or when the model
        #: predicted no decrease).
        self.reduction_ratio: float | None = None
        #: ``(α, μ)`` the quadratic rule chose for the last step (``None`` before it, or with
        #: the fixed rule)
        self.step_coefficients: tuple[float, float] | None = None
        #: the outputs whose graphs the quadratic rule keeps, with the masks of their terms
        self._graphs: list[tuple[Tensor, Tensor | None]] = []

    @property
    def damping(self) -> float:
        """The current damping (λ, or γ for ``trace_relative``): the constructor's value, or
        where adaptive damping has taken it."""
        return self.preconditioner.config.damping

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("step_rule", "fixed")  # pickled before the quadratic rule
        self.__dict__.setdefault("step_coefficients", None)
        self.__dict__.setdefault("_graphs", [])
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("kl_clip", None)
            # before kl_clip_lr the reference rate was a scheduler's initial_lr, else the lr
            group.setdefault("kl_clip_lr", group.get("initial_lr", group["lr"]))

    # ---------------------------------------------------------------- API
    def backward(self, loss: Tensor, outputs: Tensor, mask: Tensor | None = None) -> None:
        """``loss.backward()``, preceded on MC statistics steps by the sampled backward; see
        :meth:`tekfac.Preconditioner.backward`. ``mask`` marks the loss terms that enter
        ``loss`` (``labels != -100`` for ``ignore_index=-100``). With
        ``step_rule="quadratic"`` the graph of ``outputs`` is kept until the next
        :meth:`step`."""
        pre = self.preconditioner
        keep = self.step_rule == "quadratic" and not pre.probing
        pre.backward(loss, outputs, retain_graph=keep, mask=mask)
        if keep:
            self._graphs.append((outputs, mask))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim``'s, which also forgets the graphs the quadratic rule kept since the
        last step: they belong to the gradients being cleared (a step that ``GradScaler``
        skipped, an abandoned accumulation)."""
        self._graphs.clear()
        super().zero_grad(set_to_none)

    def curvature(self, module: nn.Module) -> Curvature:
        """The curvature object of a tracked module; see :class:`tekfac.curvature.Curvature`."""
        return self.preconditioner.curvature(module)

    @property
    def faults(self) -> dict[tuple[str, str], dict[str, int]]:
        """(place, cause) → ``{"first_step", "count"}`` of every fault seen (non-finite
        outputs, gradients or statistics, failed eigendecompositions); checkpointed."""
        return self.preconditioner.faults.records

    def describe(self) -> str:
        """Which modules are preconditioned and which take the first-order step, and why;
        see :meth:`tekfac.Preconditioner.describe`."""
        return self.preconditioner.describe()

    def __repr__(self) -> str:
        groups = ", ".join(str({k: v for k, v in group.items() if k != "params"})
                           for group in self.param_groups)
        return f"{type(self).__name__}({self.method}, {groups}, {self.preconditioner!r})"

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of the model's parameters, as ``torch.optim`` does: ``"params"`` (a
        parameter, or an iterable of parameters or of ``(name, parameter)`` pairs) and any of
        :data:`GROUP_OPTIONS`; the constructor's values fill in the others. Every parameter
        must be the model's and in no other group. After construction that leaves the
        parameters that were frozen then (layers unfrozen for fine-tuning): they take the
        first-order step, as a frozen layer got no Kronecker block. The group's
        ``kl_clip_lr`` is, unless given, its ``lr`` now."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param group {param_group!r}: expected a dict with a "
                            "'params' entry")
        where = f" in param group {len(self.param_groups)}"
        unknown = sorted(set(param_group) - {"params", "initial_lr", "kl_clip", *GROUP_OPTIONS})
        # a group dict given to an optimizer before holds the model's κ: accepted as it is
        if param_group.get("kl_clip", self.defaults["kl_clip"]) != self.defaults["kl_clip"]:
            raise ValueError(f"Invalid option 'kl_clip'{where}: one KL clip factor scales the "
                             "whole model's step; pass kl_clip to the constructor")
        if unknown:
            raise ValueError(f"Invalid option(s) {unknown}{where}; a param group may set "
                             f"{', '.join(GROUP_OPTIONS)}")
        if "params" not in param_group:
            raise ValueError(f"Invalid param group {len(self.param_groups)}: it has no "
                             "'params' entry")
        _check_options({**self.defaults, **param_group}, where, self.step_rule)
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # torch.optim refuses sets, unordered
            params = param_group["params"] = list(params)  # an iterator is read once
        self._check_new_parameters([params] if isinstance(params, Tensor) else params, where)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["kl_clip_lr"] is None:
            group["kl_clip_lr"] = group["lr"]

    def _check_new_parameters(self, params: Iterable[object], where: str) -> None:
        """``ValueError`` unless every entry of ``params`` (a parameter or a ``(name,
        parameter)`` pair) is a parameter of the model that is in no group yet, once."""
        names = {p: name for name, p in self.preconditioner.model.named_parameters()}
        grouped = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        seen: set[Tensor] = set()
        for entry in params:
            p = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry
            if not isinstance(p, Tensor):
                raise TypeError(f"Invalid entry {entry!r}{where}: expected parameters of the "
                                "model")
            if p not in names:
                raise ValueError(f"Invalid parameter of shape {tuple(p.shape)}{where}: it is "
                                 "not a parameter of the model, which defines what is "
                                 "optimised (build a separate optimizer for other tensors)")
            if p in grouped or p in seen:
                other = f"param group {grouped[p]}" if p in grouped else "this group"
                raise ValueError(f"Invalid parameter {names[p]!r}{where}: it is already in "
                                 f"{other}; every parameter belongs to exactly one group")
            seen.add(p)

    def _check_parameters_current(self) -> None:
        """``RuntimeError`` if a grouped parameter is no longer one of the model's: FSDP2's
        ``fully_shard`` (or anything that replaces parameters) ran after construction."""
        current = {id(p) for p in self.preconditioner.model.parameters()}
        stale = sum(id(p) not in current for group in self.param_groups for p in group["params"])
        if stale:
            raise RuntimeError(
                f"{stale} of the optimizer's parameters are no longer the model's: it was built "
                "before the model's parameters were replaced (by fully_shard, or by loading "
                "new ones). Build the optimizer after fully_shard(model), from the sharded "
                "model")

    def _check_every_parameter_grouped(self) -> None:
        """``ValueError`` naming the model's trainable parameters that are in no group."""
        grouped = {p for group in self.param_groups for p in group["params"]}
        missing = [name for name, p in self.preconditioner.model.named_parameters()
                   if p.requires_grad and p not in grouped]
        if missing:
            raise ValueError(f"Invalid params: the model's trainable parameters {missing} are "
                             "in no param group; every trainable parameter must be in exactly "
                             "one (add them to a group, e.g. with weight_decay=0.0, or freeze "
                             "them with requires_grad_(False))")

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update the curvature statistics that are due, then take one preconditioned step,
        reading each group's options (a scheduler's ``lr``) now.

        A step whose model outputs or loss (as given to :meth:`backward`) or gradient hold
        NaN or Inf is skipped whole, as ``GradScaler`` skips such steps: no parameter,
        momentum buffer, statistic or step count changes, and in a process group every rank
        skips it. Non-finite statistics of one layer skip that layer's update. Each fault is
        warned about once, with its step, and counted (:attr:`faults`)."""
        pre = self.preconditioner
        adapting = self.damping_adaptation is not None and self.damping_adaptation.due(pre.steps)
        if self.damping_adaptation is not None and closure is None:
            raise RuntimeError("damping_adaptive=True needs step(closure): a closure that "
                               "computes the batch loss, calls optimizer.backward(loss, "
                               "outputs) and returns the loss (see the class docstring)")
        self._check_parameters_current()
        rng = _RngState(self._devices()) if adapting else None
        loss = None
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            kl_clip = self._kl_clip()
            groups = {p: group for group in self.param_groups for p in group["params"]}
            cause = pre.bad_step([p.grad for p in groups if p.grad is not None])
            if cause is not None:
                pre.skip_step(cause)
                return loss
            if self.step_rule == "quadratic" and not self._graphs:
                raise RuntimeError("step_rule='quadratic' needs the graph of the model's "
                                   "outputs: call optimizer.backward(loss, outputs) instead of "
                                   "loss.backward() (with either Fisher)")
            pre.update_curvature()
            decay = {p: _coupled_decay(groups[p]) for la in pre.layers for p in la.params}
            pairs = pre.directions(decay)
            before = {p: p.detach().clone() for p in groups if p.grad is not None} \
                if adapting else {}
            predicted = None
            if self.step_rule == "quadratic":
                with stage("quadratic"):
                    predicted = self._quadratic_step(pairs, groups)
            else:
                with stage("update"):
                    self._fixed_step(pairs, groups, kl_clip)
        finally:
            self._graphs.clear()
        if adapting:
            with stage("damping"):
                self._adapt_damping(closure, loss, before, rng, predicted)
        return loss

    def _fixed_step(self, pairs: Mapping[KroneckerLayer, tuple[Tensor, Tensor]],
                    groups: Mapping[Tensor, dict], kl_clip: float | None) -> None:
        """The KL-clipped momentum step at the groups' rates (docs/design.md §4.5–6)."""
        references = {p: groups[p]["kl_clip_lr"] for la in pairs for p in la.params}
        directions, self.kl_factor = _clipped(pairs, references, kl_clip)
        for p, group in groups.items():
            if p.grad is None:
                continue
            d_p = directions.get(p)
            if d_p is None:
                coupled = _coupled_decay(group)
                d_p = p.grad if coupled == 0 else p.grad.add(p, alpha=coupled)
            self._sgd_update(p, d_p, group)

    # ---------------------------------------------------------------- the quadratic rule
    def _quadratic_step(self, pairs: Mapping[KroneckerLayer, tuple[Tensor, Tensor]],
                        groups: Mapping[Tensor, dict]) -> float | None:
        """The quadratic model's step (docs/design.md §4.7); returns the undamped model's
        change of the loss at the step taken (for the damping's ρ), or ``None`` when the
        model was not finite and no parameter moved."""
        pre = self.preconditioner
        params = [p for p in groups if p.grad is not None]
        if not params:
            return None
        lr = _shared(params, groups, "lr", "the step's multiplier")
        adapt_momentum = _shared(params, groups, "momentum", "whether μ is chosen", bool)
        tracked = {p: piece for la, (_, d) in pairs.items()
                   for p, piece in zip(la.params, la.split(d))}
        decay = [_coupled_decay(groups[p]) for p in params]
        gradients = [p.grad for p in params]
        objective = [g if eta == 0 else g.add(p, alpha=eta)
                     for p, g, eta in zip(params, gradients, decay)]
        vectors = [[tracked.get(p, d) for p, d in zip(params, objective)]]
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        if adapt_momentum and any(b is not None for b in buffers):
            vectors.append([torch.zeros_like(p) if b is None else b
                            for p, b in zip(params, buffers)])
        with torch.enable_grad():
            curvature = curvature_gram(pre.config.loss, pre.config.reduction, self._graphs,
                                       params, vectors)
        tracked_damping, untracked_damping = self._damping_weights(params, pairs)
        world = pre.comm.size
        owner = pre.work.owners is not None  # each rank holds its layers' damping
        damping_tracked, damping_untracked, decay_gram = weighted_grams(
            vectors, [tracked_damping, untracked_damping, decay])
        reduced = pre.comm.sum(torch.stack([
            curvature / world, damping_tracked if owner else damping_tracked / world]))
        curvature = reduced[0]
        damped = curvature + reduced[1] + damping_untracked + decay_gram
        b = inner_products(objective, vectors)
        w = solve(damped, b)
        if not bool(torch.isfinite(damped).all() & torch.isfinite(b).all()
                    & torch.isfinite(w).all()):
            pre.warn_once("model", "non-finite quadratic model", "no parameter update this step")
            return None
        alpha, mu = float(w[0]), float(w[1]) if len(w) > 1 else 0.0
        self.step_coefficients = (alpha, mu)
        for i, p in enumerate(params):
            group = groups[p]
            if group["decoupled_weight_decay"] and group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            update = vectors[0][i].mul(lr * alpha)
            if mu:
                update.add_(vectors[1][i], alpha=lr * mu)
            if adapt_momentum:
                self.state[p]["momentum_buffer"] = update
            p.sub_(update)
        return model_change(curvature, inner_products(gradients, vectors), w * lr)

    def _damping_weights(self, params: list[Tensor],
                         pairs: Mapping[KroneckerLayer, tuple[Tensor, Tensor]]
                         ) -> tuple[list[float], list[float]]:
        """Per parameter of ``params``, the ``λ`` of the quadratic model, split in two lists
        (the other's entry 0): a tracked layer's on the ranks that hold its curvature, its
        block's :meth:`~tekfac.curvature.Curvature.isotropic_damping` (the damping itself
        before its first curvature); every other parameter's, the damping (its floor for
        ``trace_relative``, whose γ is relative to a block)."""
        pre, config = self.preconditioner, self.preconditioner.config
        fallback = config.damping_floor if config.damping_type == "trace_relative" \
            else config.damping
        multiplier = pre.curvature_multiplier() if pairs else 1.0
        layer_damping = {}
        for layer in pairs:
            state = pre.states[layer]
            if not pre.work.mine(layer):
                value = 0.0
            elif state.has_basis and state.scaling is not None:
                value = Curvature(layer, state, config, multiplier).isotropic_damping()
            else:
                value = fallback
            layer_damping.update({p: value for p in layer.params})
        tracked = [layer_damping.get(p, 0.0) for p in params]
        untracked = [0.0 if p in layer_damping else fallback for p in params]
        return tracked, untracked

    # ---------------------------------------------------------------- adaptive damping
    def _adapt_damping(self, closure: Callable[[], float], loss: float,
                       before: dict[Tensor, Tensor], rng: _RngState,
                       predicted: float | None = None) -> None:
        """Compare the loss change of the step just taken (``θ - before``) with the quadratic
        model's prediction and adapt the damping (docs/design.md §3). The model is the
        approximation's (``c·F̂``) unless the quadratic rule gives its exact ``predicted``
        change (already the same on every rank)."""
        pre = self.preconditioner
        delta = {p: p.detach() - old for p, old in before.items()}
        linear = sum((torch.vdot(p.grad.reshape(-1), d.reshape(-1)) for p, d in delta.items()),
                     torch.zeros(()))
        quadratic = torch.zeros((), dtype=torch.float64)
        for layer in pre.layers if predicted is None else ():
            state = pre.states[layer]
            if (pre.work.mine(layer) and state.has_basis and state.scaling is not None
                    and all(p in delta for p in layer.params)):
                step = layer.matrix([delta[p] for p in layer.params])
                quadratic += pre.curvature(layer.module).quadratic_form(step).cpu().double()
        new_loss = self._loss_after_step(closure, rng)
        owner = pre.work.owners is not None  # each rank holds its layers' share of the form
        world = pre.comm.size
        totals = pre.comm.sum(torch.stack([
            torch.tensor((new_loss - _value(loss)) / world, dtype=torch.float64),
            linear.cpu().double() / world,
            quadratic if owner else quadratic / world])).tolist()
        actual = totals[0]
        if predicted is None:
            predicted = totals[1] + 0.5 * totals[2]  # c·F̂: the loss's units
        self.reduction_ratio = reduction_ratio(actual, predicted)
        damping = self.damping_adaptation.adapted(pre.config.damping, self.reduction_ratio,
                                                  pre.config.damping_floor)
        if damping != pre.config.damping and math.isfinite(damping):
            pre.config = dataclasses.replace(pre.config, damping=damping)

    def _loss_after_step(self, closure: Callable[[], float], rng: _RngState) -> float:
        """The closure's loss at the new parameters, under ``torch.no_grad``, with the RNG
        state of the step's first call and the model's buffers restored afterwards."""
        pre = self.preconditioner
        buffers = [(b, b.detach().clone()) for b in pre.model.buffers()]
        pre.probing = True
        try:
            with torch.random.fork_rng(devices=rng.devices), torch.no_grad():
                rng.restore()
                try:
                    value = closure()
                except RuntimeError as e:
                    if "does not require grad" not in str(e):
                        raise
                    raise RuntimeError(
                        "damping_adaptive=True evaluates the closure a second time after the "
                        "step, under torch.no_grad, to measure the loss change: call "
                        "optimizer.backward(loss, outputs) in it, not loss.backward()") from e
        finally:
            pre.probing = False
            for buffer, saved in buffers:
                buffer.copy_(saved)
        return _value(value)

    def _devices(self) -> list[int]:
        """The CUDA devices of the parameters (whose RNG states a probe must restore)."""
        return sorted({p.device.index or 0 for g in self.param_groups for p in g["params"]
                       if p.device.type == "cuda"})

    def _kl_clip(self) -> float | None:
        """κ, which every group holds (the constructor's or a checkpoint's value)."""
        clips = {group["kl_clip"] for group in self.param_groups}
        if len(clips) > 1:
            raise ValueError(f"Invalid kl_clip: the param groups hold {sorted(clips, key=str)}, "
                             "but one KL clip factor scales the whole model's step; set the "
                             "same value in every group")
        return clips.pop()

    def _sgd_update(self, p: Tensor, d_p: Tensor, group: dict) -> None:
        """Momentum on the update, docs/design.md §4.6: ``u ← μ u + lr·d``, ``θ ← θ − u``
        (Nesterov: ``θ ← θ − (lr·d + μ u)``); the buffer ``u`` is the previous update, each
        direction entering at the rate of its own step. With a constant rate this is
        ``torch.optim.SGD``'s rule (no dampening), whose buffer is ``u / lr``."""
        lr, momentum = group["lr"], group["momentum"]
        if group["decoupled_weight_decay"] and group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        if not momentum:
            p.add_(d_p, alpha=-lr)
            return
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.mul(d_p.detach(), lr)
        else:
            buf.mul_(momentum).add_(d_p, alpha=lr)
        if group["nesterov"]:
            p.add_(d_p, alpha=-lr).add_(buf, alpha=-momentum)
        else:
            p.sub_(buf)

    # ---------------------------------------------------------------- checkpoints
    def _add_state_entries(self) -> None:
        """Give every parameter a (possibly empty) entry in :attr:`state`, so that the state
        is never empty: ``torch.distributed.checkpoint.state_dict`` takes a zero-gradient
        step on an optimizer without state to create it, which for this one would count a
        step without statistics."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state.setdefault(p, {})

    def state_dict(self) -> dict:
        """The ``torch.optim`` state (momentum buffers, every group's options) and, in
        ``param_groups[0]["tekfac"]``, the format, the curvature
        (:meth:`Preconditioner.state_dict`) and, with adaptive damping, the current damping.

        The state is complete, so that a fresh optimizer's state dict is a template that
        ``torch.distributed.checkpoint`` can load into: every parameter has an entry, every
        parameter of a group with momentum a buffer (zeros where none exists yet, which
        :meth:`load_state_dict` reads as none) and every curvature field a tensor (zeros
        where unset, with flags of which are set). On a model sharded by FSDP2 each rank's
        holds the curvature of the layers it owns (save with ``torch.distributed.
        checkpoint``); with DDP in 'owner' mode it is a collective that gathers it all."""
        state = super().state_dict()
        ids = [i for group in state["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p, group in zip(ids, params, self._group_of_each()):
            entry = dict(state["state"].get(i, {}))  # a copy: the live state stays as it is
            if group["momentum"] and "momentum_buffer" not in entry:
                entry["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["state"][i] = entry
        tekfac = {_FORMAT_KEY: FORMAT, _CURVATURE_KEY: self.preconditioner.state_dict()}
        if self.damping_adaptation is not None:
            tekfac[_DAMPING_KEY] = self.damping
        state["param_groups"][0][_TEKFAC_KEY] = tekfac
        return state

    def _group_of_each(self) -> list[dict]:
        """The group of each parameter, in the order of ``param_groups``."""
        return [group for group in self.param_groups for _ in group["params"]]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (or one of format 1 or 2); ``ValueError`` if it does
        not match the model or the param groups (their number and sizes, as ``torch.optim``
        checks), if it holds no tekfac state, or if its ``state`` has keys that name no
        parameter of its groups (``torch.optim`` would silently drop them). Zero momentum
        buffers (a template's) are taken as none.

        A checkpoint of format 1 (before issue #32, tekfac 0.1.0 included) is converted, with
        a warning that says what changed: its momentum buffers (``torch.optim.SGD``'s, in units
        of the direction) become updates by their group's rate (exact while the rate is
        constant), its statistics' averages continue as the plain EMA they were, and its
        curvature is now read in the units of the loss (``c·F̂``, docs/design.md §3), which
        changes the steps of a loss that averages ``K > 1`` terms per example unless ``lr``,
        ``damping`` and ``kl_clip`` are multiplied by ``K``."""
        state_dict, tekfac = _split_tekfac_state(state_dict)
        curvature = tekfac[_CURVATURE_KEY]
        damping = tekfac.get(_DAMPING_KEY)
        saved_format = tekfac.get(_FORMAT_KEY, 1)
        previous = self.preconditioner.state_dict(gather=False)
        self.preconditioner.load_state_dict(curvature)  # validates against the model first
        try:
            super().load_state_dict(state_dict)
        except (ValueError, KeyError, TypeError):
            self.preconditioner.load_state_dict(previous)
            raise
        self._add_state_entries()
        if saved_format < 2:
            self._convert_format_1()
        if damping is not None and self.damping_adaptation is not None:  # else the constructor's
            pre = self.preconditioner
            pre.config = dataclasses.replace(pre.config, damping=float(damping))

    def _convert_format_1(self) -> None:
        """Momentum buffers of format 1 (``b``, with ``θ ← θ − lr·b``) as updates ``lr·b``."""
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(group["lr"])
        warnings.warn(
            "tekfac: this checkpoint has format 1 (before tekfac's issue #32): its momentum "
            "buffers were converted to updates (lr·b; exact while the rate is constant) and its "
            "statistics' averages continue as plain EMAs. The curvature is now that of the loss "
            "as reduced (c·F̂, docs/design.md §3): for a loss that averages K > 1 terms per "
            "example (pixels, positions), multiply lr, damping and kl_clip by K to keep the "
            "steps it took", stacklevel=3)


def _split_tekfac_state(state_dict: dict) -> tuple[dict, dict]:
    """``(torch.optim's state dict, tekfac's entry)`` of a checkpoint of any format: the
    entry of ``param_groups[0]`` (format 3) or the top-level keys (formats 1 and 2); state
    keys written as strings (``"0"``, as a flattening tool may give them) read as the ids
    they name, and zero momentum buffers dropped. ``ValueError`` if there is no tekfac
    state, or a state key names no parameter of the groups."""
    state_dict = dict(state_dict)
    groups = [dict(group) for group in state_dict.get("param_groups", [])]
    if _CURVATURE_KEY in state_dict:  # formats 1 and 2
        tekfac = {key: state_dict.pop(key) for key in (_CURVATURE_KEY, _DAMPING_KEY, _FORMAT_KEY)
                  if key in state_dict}
    elif groups and _TEKFAC_KEY in groups[0]:
        tekfac = groups[0].pop(_TEKFAC_KEY)
    else:
        raise ValueError("Invalid state_dict: it holds no tekfac state (no 'tekfac' entry in "
                         "param_groups[0], nor a top-level 'curvature'): it was not saved by "
                         "a tekfac optimizer, or was built from an optimizer without it")
    ids = {i for group in groups for i in group.get("params", [])}
    state = {}
    for key, entry in state_dict.get("state", {}).items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if key not in ids:
            raise ValueError(f"Invalid state_dict: its 'state' has key {key!r}, which names no "
                             f"parameter of its param_groups (ids {sorted(ids, key=str)})")
        buffer = entry.get("momentum_buffer")
        if buffer is not None and not bool(full((buffer != 0).sum()) > 0):  # all ranks' shards
            entry = {k: v for k, v in entry.items() if k != "momentum_buffer"}
        state[key] = entry
    state_dict.update(state=state, param_groups=groups)
    return state_dict, tekfac


def _value(loss: Tensor | float) -> float:
    """A closure's loss as a Python float."""
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


class _RngState:
    """The CPU and CUDA (``devices``) random states at construction, to restore later."""

    def __init__(self, devices: list[int]):
        self.devices = devices
        self._cpu = torch.get_rng_state()
        self._cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self._cpu)
        for device, state in zip(self.devices, self._cuda):
            torch.cuda.set_rng_state(state, device)


def _adaptation(option: object, grad_scaler: object) -> DampingAdaptation | None:
    """The damping adaptation that ``damping_adaptive`` asks for, validated."""
    if isinstance(option, DampingAdaptation):
        adaptation = option
    else:
        check_instance("damping_adaptive", option, bool,
                       "True, False or a tekfac.damping_adaptation.DampingAdaptation")
        adaptation = DampingAdaptation() if option else None
    if adaptation is not None and grad_scaler is not None:
        raise ValueError("Invalid damping_adaptive with a grad_scaler: adaptive damping needs "
                         "step(closure), which GradScaler.step does not support; adapt the "
                         "damping in full precision or turn it off")
    return adaptation


def _check_sharded_options(sharded: Sequence[str], quadratic: bool,
                    adaptation: DampingAdaptation | None) -> None:
    """``ValueError`` for the options that need the whole parameter vector on every rank at
    once (the quadratic rule's Jacobian products, adaptive damping's second evaluation),
    which a model sharded by FSDP2 does not have."""
    if not sharded:
        return
    for name, used in (("step_rule='quadratic'", quadratic),
                       ("damping_adaptive", adaptation is not None)):
        if used:
            raise ValueError(
                f"Invalid {name} for a model sharded by FSDP2 ({len(sharded)} DTensor "
                f"parameters, e.g. {sharded[0]!r}): it needs products with the whole "
                "parameter vector, which the shards do not hold; use the fixed step rule and "
                "a fixed damping, or DDP")


def _check_options(options: Mapping[str, object], where: str = "",
                   step_rule: str = "fixed") -> None:
    """Validate the :data:`GROUP_OPTIONS` of the constructor (``where=""``) or of a group."""
    check_number(f"lr{where}", options["lr"], 0.0)
    if options["kl_clip_lr"] is not None:
        check_number(f"kl_clip_lr{where}", options["kl_clip_lr"], 0.0)
    check_number(f"weight_decay{where}", options["weight_decay"], 0.0)
    check_number(f"momentum{where}", options["momentum"], 0.0, 1.0, high_open=True)
    check_instance(f"nesterov{where}", options["nesterov"], bool, "True or False")
    check_instance(f"decoupled_weight_decay{where}", options["decoupled_weight_decay"], bool,
                   "True or False")
    if options["nesterov"] and options["momentum"] == 0:
        raise ValueError(f"Invalid nesterov=True with momentum=0{where}: Nesterov needs "
                         "momentum > 0")
    if options["nesterov"] and step_rule == "quadratic":
        raise ValueError(f"Invalid nesterov=True with step_rule='quadratic'{where}: the "
                         "quadratic model chooses the momentum of the update itself")


def _shared(params: Sequence[Tensor], groups: Mapping[Tensor, dict], key: str, meaning: str,
            kind: type = float) -> object:
    """The value of group option ``key`` (as ``kind``) that every group of ``params`` must
    share under the quadratic rule, which takes one step for the whole model."""
    values = {kind(groups[p][key]) for p in params}
    if len(values) > 1:
        raise ValueError(f"Invalid param groups for step_rule='quadratic': their {key!r} "
                         f"({meaning}) differ, {sorted(values)}, but the quadratic model "
                         "chooses one step for the whole model; give every group the same "
                         f"{key}")
    return values.pop() if values else kind(0)


def _coupled_decay(group: Mapping[str, object]) -> float:
    """The decay a group adds to the gradient before preconditioning (0 if decoupled)."""
    return 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]


def _clipped(pairs: Mapping[KroneckerLayer, tuple[Tensor, Tensor]], rates: Mapping[Tensor, float],
             kl_clip: float | None) -> tuple[dict[Tensor, Tensor], Tensor | None]:
    """Parameter → KL-clipped preconditioned direction ``νΔ``, for the tracked layers, from
    their ``(∇, Δ)`` pairs and the reference rate (``kl_clip_lr``) of each parameter's group;
    and ``ν`` (``None`` without clipping)."""
    directions = {la: d for la, (_, d) in pairs.items()}
    nu = None
    if kl_clip is not None and pairs:
        nu = _kl_clip_factor(_kl_quadratic(pairs, rates), kl_clip)
        directions = {la: d * nu for la, d in directions.items()}
    return {p: piece for la, d in directions.items()
            for p, piece in zip(la.params, la.placed(d))}, nu


def _kl_quadratic(pairs: Mapping[KroneckerLayer, tuple[Tensor, Tensor]],
                  rates: Mapping[Tensor, float]) -> Tensor:
    """``Σ_p lr_p² ⟨Δ_p, ∇_p⟩`` over the tracked parameters. A layer whose parameters share
    one rate contributes ``⟨Δ_l, ∇_l⟩`` of its whole matrix, and each rate multiplies the
    sum of its terms, so that one group gives exactly ``lr² Σ_l ⟨Δ_l, ∇_l⟩``."""
    terms: dict[float, list[Tensor]] = {}
    for layer, (grad, direction) in pairs.items():
        lrs = [rates[p] for p in layer.params]
        pieces = ([(lrs[0], grad, direction)] if len(set(lrs)) == 1
                  else zip(lrs, layer.split(grad), layer.split(direction)))
        for lr, g, d in pieces:
            terms.setdefault(lr, []).append(torch.vdot(g.reshape(-1), d.reshape(-1)))
    return torch.stack([torch.stack(v).sum() * lr**2 for lr, v in terms.items()]).sum()


def _kl_clip_factor(quadratic: Tensor, kl_clip: float) -> Tensor:
    """``ν = min(1, sqrt(κ / q))`` for ``q = Σ_p lr_p² ⟨Δ_p, ∇_p⟩``, as a tensor (no host
    synchronisation); 1 when ``q`` is not positive (e.g. every rate is 0)."""
    safe = torch.where(quadratic > 0, quadratic, torch.ones_like(quadratic))
    return torch.where(quadratic > 0, (kl_clip / safe).sqrt().clamp(max=1.0),
                       torch.ones_like(quadratic))


class KFAC(KroneckerOptimizer):
    """KFAC (Martens & Grosse 2015; KFC for conv): ``F̂ = G ⊗ A``. Arguments as for
    :class:`KroneckerOptimizer` (``scale_update_freq`` is ignored)."""

    def __init__(self, model: nn.Module, **kwargs: object):
        super().__init__(model, "kfac", **kwargs)


class EKFAC(KroneckerOptimizer):
    """EKFAC (George et al. 2018): KFAC's eigenbasis with corrected eigenvalues
    ``S = E[(U_out^T D_i U_in)^{∘2}]``. Arguments as for :class:`KroneckerOptimizer`."""

    def __init__(self, model: nn.Module, **kwargs: object):
        super().__init__(model, "ekfac", **kwargs)


class TKFAC(KroneckerOptimizer):
    """TKFAC (Gao et al. 2020): ``F̂ = δ Ψ ⊗ Φ`` with trace-one factors and ``δ = tr F``.
    Arguments as for :class:`KroneckerOptimizer` (``scale_update_freq`` is ignored)."""

    def __init__(self, model: nn.Module, **kwargs: object):
        super().__init__(model, "tkfac", **kwargs)


class TEKFAC(KroneckerOptimizer):
    """TEKFAC (Gao et al. 2020): the eigenbasis of TKFAC's ``Ψ ⊗ Φ`` with corrected
    eigenvalues, docs/design.md §2. Arguments as for :class:`KroneckerOptimizer`."""

    def __init__(self, model: nn.Module, **kwargs: object):
        super().__init__(model, "tekfac", **kwargs)
