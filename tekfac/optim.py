"""The optimizer: preconditioning + KL clipping + momentum SGD (docs/design.md §4.4–6).

:class:`KroneckerOptimizer` is one ``torch.optim.Optimizer`` composed from a
:class:`tekfac.Preconditioner`; :class:`KFAC`, :class:`EKFAC`, :class:`TKFAC` and
:class:`TEKFAC` are its four named configurations (docs/design.md §2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from tekfac.config import check_instance, check_number
from tekfac.curvature import Curvature
from tekfac.preconditioner import Preconditioner
from tekfac.profiling import stage

_CURVATURE_KEY = "curvature"


class KroneckerOptimizer(torch.optim.Optimizer):
    """Momentum SGD on Kronecker-factored natural gradients.

    Per step, for every tracked layer with gradient matrix ``∇ = [dW | db]`` (plus
    ``weight_decay·M`` if the decay is coupled):

    .. math::
        Δ = (F̂ + \\text{damping})^{-1} ∇, \\qquad
        ν = \\min\\Big(1, \\sqrt{\\frac{κ}{\\text{lr}^2 \\sum_l \\langle Δ_l, ∇_l \\rangle}}\\Big),

    then the SGD rule ``b ← μ b + νΔ``, ``θ ← θ - lr·b`` (``νΔ + μ b`` with Nesterov). Every
    other parameter (BatchNorm, LayerNorm, excluded layers, ...) takes the same momentum step
    on its raw gradient. Decoupled weight decay multiplies all parameters by
    ``1 - lr·weight_decay`` before the step (AdamW style).

    With ``fisher="mc"`` (default) use ``optimizer.backward(loss, outputs)`` instead of
    ``loss.backward()``; with ``fisher="empirical"`` the ordinary loop works unchanged.

    Args:
        model: the model to train (its own parameters are optimised; a
            ``DistributedDataParallel`` wrapper is accepted).
        method: ``"kfac"``, ``"ekfac"``, ``"tkfac"`` or ``"tekfac"``.
        lr: learning rate (≥ 0).
        momentum: momentum factor μ in ``[0, 1)``.
        nesterov: use Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 coefficient (≥ 0).
        decoupled_weight_decay: apply the decay to the parameters directly instead of adding
            it to the gradient before preconditioning.
        kl_clip: κ of the KL clipping (Ba et al. 2017), or ``None`` to turn it off.
        exclude: modules or module-name patterns left to the first-order rule.
        seed: seed of the MC label sampler; default ``torch.initial_seed()``.
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop, so that the
            recorded output gradients are unscaled (use ``scaler.step(optimizer)`` as usual).
        distributed_mode: in a process group, ``"replicated"`` (every rank keeps every
            eigenbasis; the decompositions are split over ranks and broadcast) or ``"owner"``
            (KFAC/TKFAC only: each layer's basis lives on one rank, which preconditions that
            layer and broadcasts the direction: less memory, a broadcast per step).
        damping, damping_type, damping_floor, fisher, loss, reduction, stat_decay,
        cov_update_freq, eigen_update_freq, scale_update_freq, factor_dtype: see
            :class:`tekfac.config.CurvatureConfig`. ``scale_update_freq`` is ignored by KFAC
            and TKFAC.
    """

    def __init__(self, model: nn.Module, method: str = "tekfac", *, lr: float = 0.01,
                 momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, kl_clip: float | None = 1e-3,
                 exclude: Iterable[nn.Module | str] = (), seed: int | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None,
                 distributed_mode: str = "replicated", **curvature_options: object):
        check_number("lr", lr, 0.0)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, 0.0, low_open=True)
        check_instance("nesterov", nesterov, bool, "True or False")
        check_instance("decoupled_weight_decay", decoupled_weight_decay, bool, "True or False")
        if nesterov and momentum == 0:
            raise ValueError("Invalid nesterov=True with momentum=0: Nesterov needs momentum > 0")
        self.preconditioner = Preconditioner(model, method, exclude=exclude, seed=seed,
                                             grad_scaler=grad_scaler,
                                             distributed_mode=distributed_mode,
                                             **curvature_options)
        params = [p for p in self.preconditioner.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Invalid model: it has no trainable parameters")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, kl_clip=kl_clip)
        super().__init__(params, defaults)
        self.method = method.lower()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("kl_clip", None)

    # ---------------------------------------------------------------- API
    def backward(self, loss: Tensor, outputs: Tensor) -> None:
        """``loss.backward()``, preceded on MC statistics steps by the sampled backward; see
        :meth:`tekfac.Preconditioner.backward`."""
        self.preconditioner.backward(loss, outputs)

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
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"{type(self).__name__}({self.method}, {group}, {self.preconditioner!r})"

    def add_param_group(self, param_group: dict) -> None:
        """Only the constructor's single group is allowed: curvature, KL clipping and the
        learning rate are shared by all of the model's parameters."""
        if self.param_groups:
            raise ValueError("KroneckerOptimizer keeps all of the model's parameters in one group; "
                             "build a separate optimizer (or use tekfac.Preconditioner) instead")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update the curvature statistics that are due, then take one preconditioned step.

        A step whose model outputs or loss (as given to :meth:`backward`) or gradient hold
        NaN or Inf is skipped whole, as ``GradScaler`` skips such steps: no parameter,
        momentum buffer, statistic or step count changes, and in a process group every rank
        skips it. Non-finite statistics of one layer skip that layer's update. Each fault is
        warned about once, with its step, and counted (:attr:`faults`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        coupled = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
        pre = self.preconditioner
        cause = pre.bad_step([p.grad for p in group["params"] if p.grad is not None])
        if cause is not None:
            pre.skip_step(cause)
            return loss
        pre.update_curvature()
        pairs = self.preconditioner.directions(coupled)
        with stage("update"):
            directions = self._clipped(pairs, group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = directions.get(p)
                if d_p is None:
                    d_p = p.grad if coupled == 0 else p.grad.add(p, alpha=coupled)
                self._sgd_update(p, d_p, group)
        return loss

    def _clipped(self, pairs: dict, group: dict) -> dict[Tensor, Tensor]:
        """Parameter → KL-clipped preconditioned direction, for the tracked layers, from
        their ``(∇, Δ)`` pairs."""
        directions = {la: d for la, (_, d) in pairs.items()}
        if group["kl_clip"] is not None and pairs:
            vdot = torch.stack([torch.vdot(g.reshape(-1), d.reshape(-1))
                                for g, d in pairs.values()]).sum()
            nu = _kl_clip_factor(vdot, group["lr"], group["kl_clip"])
            directions = {la: d * nu for la, d in directions.items()}
        return {p: piece for la, d in directions.items()
                for p, piece in zip(la.params, la.split(d))}

    def _sgd_update(self, p: Tensor, d_p: Tensor, group: dict) -> None:
        """``torch.optim.SGD``'s rule (no dampening) on the direction ``d_p``."""
        lr, momentum = group["lr"], group["momentum"]
        if group["decoupled_weight_decay"] and group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        if momentum:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.detach().clone()
            else:
                buf.mul_(momentum).add_(d_p)
            d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(d_p, alpha=-lr)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The ``torch.optim`` state (momentum buffers, hyper-parameters) plus the curvature
        state under the key ``"curvature"``."""
        state = super().state_dict()
        state[_CURVATURE_KEY] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it does not match the model."""
        if _CURVATURE_KEY not in state_dict:
            raise ValueError("Invalid state_dict: no 'curvature' entry; it was not saved by a "
                             "tekfac optimizer")
        state_dict = dict(state_dict)
        curvature = state_dict.pop(_CURVATURE_KEY)
        previous = self.preconditioner.state_dict()
        self.preconditioner.load_state_dict(curvature)  # validates against the model first
        try:
            super().load_state_dict(state_dict)
        except (ValueError, KeyError, TypeError):
            self.preconditioner.load_state_dict(previous)
            raise


def _kl_clip_factor(vdot: Tensor, lr: float, kl_clip: float) -> Tensor:
    """``ν = min(1, sqrt(κ / (lr² Σ⟨Δ,∇⟩)))`` as a tensor (no host synchronisation); 1 when
    the quadratic form is not positive or lr is 0."""
    denom = vdot * lr**2
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, (kl_clip / safe).sqrt().clamp(max=1.0), torch.ones_like(denom))


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
