"""The optimizers of the comparison, built from per-task hyper-parameters.

Baselines (all from maintained libraries, none re-implemented here):

* ``sgd``: ``torch.optim.SGD`` with Nesterov momentum 0.9 (benchmark v2; it was heavy-ball
  momentum before, the values in ``tekfac/bench/tuned/`` were tuned with that).
* ``adam``: ``torch.optim.Adam`` (coupled L2), the previous protocol's baseline, kept.
* ``adamw``: ``torch.optim.AdamW`` (decoupled weight decay).
* ``muon``: ``torch.optim.Muon`` on the 2-D weights of the hidden layers (:func:`muon_split`),
  ``torch.optim.AdamW`` on the rest, as Muon's documentation prescribes; Muon's step is scaled
  with ``adjust_lr_fn="match_rms_adamw"`` so that both halves share one learning rate and one
  weight decay (Moonshot's rule, which the documentation says lets Muon reuse AdamW's values).
  On CPU its Newton–Schulz iteration runs in float32 instead of torch's bfloat16
  (:class:`tekfac.bench.muon.CPUMuon`: bfloat16 products are several times slower on CPUs
  without bfloat16 units), nothing else changed.
* ``soap`` and ``shampoo``: ``pytorch_optimizer.SOAP`` and ``pytorch_optimizer.ScalableShampoo``
  (the optional ``bench`` extra, ``pip install -e .[bench]``): SOAP with its defaults
  (betas (0.95, 0.95), preconditioner every 10 steps), Shampoo with RMSProp grafting, Nesterov
  momentum and its roots every 100 steps (as the Kronecker methods' eigenbases) from step 25.

Weight decay: ``hparams["weight_decay"]`` when given (the decoupled optimizers search it, see
:mod:`tekfac.bench.search`), else the task's value; coupled (L2) for ``sgd``, ``adam``,
``shampoo`` and the Kronecker methods, decoupled for ``adamw``, ``muon`` and ``soap``.
Every optimizer follows the same schedule (:func:`warmup_cosine_schedule`).

The Kronecker methods use the MC Fisher, momentum 0.9, ``stat_decay`` 0.95 and statistics
every 10 / eigenbases every 100 / corrected scalings every 10 steps (docs/design.md §6); the
tuned hyper-parameters are the learning rate, the damping and the KL-clip bound κ (``kl_clip``,
1e-3 when not given); ``damping_adaptive`` (a search coordinate in [0, 1], on from 0.5) turns
on the Levenberg–Marquardt damping with its default schedule (:func:`take_step` then steps in a
closure), ``basis_refresh_freq`` the cheap basis refresh and ``basis_rank`` the rank-k
eigenbases (docs/design.md §3, §4.2, §2(d)); ``cov_update_freq``, ``eigen_update_freq`` and
``scale_update_freq`` replace the fixed intervals (pilots only: the campaign keeps them fixed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

import tekfac
from tekfac.bench.muon import CPUMuon

#: The Kronecker methods: every method of the library (kfac, ekfac, tkfac, tekfac).
SECOND_ORDER = tuple(tekfac.METHODS)
#: The baselines, in table order.
BASELINES = ("sgd", "adam", "adamw", "muon", "soap", "shampoo")
#: Every optimizer of the comparison: the baselines, then the Kronecker methods.
OPTIMIZERS = (*BASELINES, *SECOND_ORDER)
#: Baselines that need the optional ``bench`` extra, and the module they come from.
EXTRA_MODULES = {"soap": "pytorch_optimizer", "shampoo": "pytorch_optimizer"}

#: Used when a task has no tuned configuration (see ``tekfac/bench/tuned/``); for sgd, adam and
#: the Kronecker methods the values docs/design.md §6 measured on the Fashion-MNIST CNN, for
#: the others their libraries' documented defaults.
DEFAULT_HPARAMS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.05},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
    "muon": {"lr": 1e-3, "weight_decay": 0.1},
    "soap": {"lr": 3e-3, "weight_decay": 1e-2},
    "shampoo": {"lr": 1e-3},
    **{m: {"lr": 0.01, "damping": 0.1} for m in SECOND_ORDER},
}

#: The Kronecker methods' values with ``tekfac bench --step-rule quadratic`` (no tuning file):
#: the quadratic model's step at multiplier 1, Levenberg–Marquardt damping from the library's
#: default 0.1 (docs/design.md §3, §4.7), and kfac-jax's intervals: statistics every step,
#: bases every 5 (on the autoencoder TEKFAC ended at 8.36 with them and 17.0 with the fixed
#: rule's 10 and 100; docs/results/README.md).
QUADRATIC_HPARAMS = {"lr": 1.0, "damping": 0.1, "damping_adaptive": 1.0, "quadratic": 1.0,
                     "cov_update_freq": 1, "eigen_update_freq": 5, "scale_update_freq": 1}

KRONECKER_SETTINGS = dict(momentum=0.9, kl_clip=1e-3, stat_decay=0.95, cov_update_freq=10,
                          eigen_update_freq=100, scale_update_freq=10, fisher="mc")
#: Kronecker options a trial's values may set (JSON numbers, passed on as ints).
_INTEGER_OPTIONS = ("cov_update_freq", "eigen_update_freq", "scale_update_freq",
                    "basis_refresh_freq", "basis_rank")


class MissingExtraError(ImportError):
    """A baseline's package is not installed; the message names the extra to install."""


class ChainedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together (Muon + AdamW).

    ``param_groups`` is the list of the parts' groups themselves (the same dicts), so that a
    learning-rate scheduler scales every part alike.
    """

    def __init__(self, *parts: torch.optim.Optimizer):
        super().__init__([p for o in parts for g in o.param_groups for p in g["params"]], {})
        self.parts = parts
        self.param_groups = [g for o in parts for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.parts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)


def muon_split(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``(muon, rest)``: Muon takes every 2-D parameter except the weights of ``nn.Embedding``
    modules and of the output head (the last ``nn.Linear`` in module order), or any parameter
    tied to them; convolution kernels (4-D), biases and norms go to the rest."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if linears:
        excluded.add(id(linears[-1].weight))
    muon, rest = [], []
    for p in model.parameters():  # each parameter once, tied ones included
        (muon if p.ndim == 2 and id(p) not in excluded else rest).append(p)
    return muon, rest


def _pytorch_optimizer(name: str):
    try:
        import pytorch_optimizer
    except ImportError as e:
        raise MissingExtraError(
            f"optimizer {name!r} needs the package pytorch-optimizer, which is not installed; "
            "install the benchmark extra (pip install -e '.[bench]', or pip install --no-deps "
            "pytorch-optimizer to keep your torch) or leave it out with --optimizers") from e
    return pytorch_optimizer


def make_optimizer(name: str, model: nn.Module, hparams: dict[str, float], loss: str,
                   weight_decay: float, **options: object) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``.

    ``hparams`` holds ``lr`` and, optionally, ``weight_decay`` (else the task's
    ``weight_decay``); for the Kronecker methods also ``damping`` and optionally ``kl_clip``,
    ``damping_adaptive`` and ``quadratic`` (the quadratic step rule; both on from 0.5).
    ``options`` go to the Kronecker methods (e.g. ``distributed_mode``).

    Raises:
        MissingExtraError: ``soap`` or ``shampoo`` without the ``bench`` extra.
        ValueError: An unknown name.
    """
    lr = hparams["lr"]
    wd = hparams.get("weight_decay", weight_decay)
    params = list(model.parameters())
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "muon":
        hidden, rest = muon_split(model)
        parts = [torch.optim.AdamW(rest, lr=lr, weight_decay=wd)] if rest else []
        if hidden:
            parts.insert(0, CPUMuon(hidden, lr=lr, weight_decay=wd,
                                    adjust_lr_fn="match_rms_adamw"))
        return ChainedOptimizer(*parts)
    if name == "soap":
        return _pytorch_optimizer(name).SOAP(params, lr=lr, weight_decay=wd)
    if name == "shampoo":
        po = _pytorch_optimizer(name)
        from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

        return po.ScalableShampoo(params, lr=lr, weight_decay=wd, nesterov=True,
                                  graft_type=LayerWiseGrafting.RMSPROP,
                                  start_preconditioning_step=25,
                                  preconditioning_compute_steps=100)
    if name in SECOND_ORDER:
        settings = {**KRONECKER_SETTINGS, **options}
        if "kl_clip" in hparams:
            settings["kl_clip"] = hparams["kl_clip"]
        for key in _INTEGER_OPTIONS:
            if key in hparams:
                settings[key] = int(hparams[key])
        if hparams.get("damping_adaptive", 0.0) >= 0.5:
            settings["damping_adaptive"] = True
        if hparams.get("quadratic", 0.0) >= 0.5:  # the model sets the step: no KL clip
            settings.update(step_rule="quadratic", kl_clip=None)
        # text-gpt's attention has no block (its projections are F.linear calls): say so,
        # which is what silences the construction's warning about unclaimed weights
        attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        settings.setdefault("exclude", attention)
        return tekfac.KroneckerOptimizer(model, name, lr=lr, damping=hparams["damping"],
                                         loss=loss, weight_decay=wd, **settings)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                           warmup_fraction: float = 0.0):
    """Linear warm-up over the first ``w = round(warmup_fraction · total)`` steps, then cosine
    decay to 0: ``lr_t = lr · (t+1)/w`` for ``t < w``, else
    ``lr · (1 + cos(π (t-w) / (total-w))) / 2``; stepped once per minibatch."""
    warm = round(warmup_fraction * total_steps)

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        rest = max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t - warm, rest) / rest))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    """``lr_t = lr · (1 + cos(π t / total)) / 2``, stepped once per minibatch (no warm-up)."""
    return warmup_cosine_schedule(optimizer, total_steps, 0.0)


def take_step(optimizer: torch.optim.Optimizer, compute: Callable[[], tuple[Tensor, Tensor]]
              ) -> Tensor:
    """One training step: ``loss, outputs = compute()``, ``zero_grad``, :func:`backward`,
    ``step``; all in a closure given to ``step`` when the optimizer adapts its damping (it
    evaluates the closure again after the step). Returns the loss."""
    def closure() -> Tensor:
        loss, outputs = compute()
        optimizer.zero_grad(set_to_none=True)
        backward(optimizer, loss, outputs)
        return loss

    if getattr(optimizer, "damping_adaptation", None) is not None:
        return optimizer.step(closure)
    loss = closure()
    optimizer.step()
    return loss


def backward(optimizer: torch.optim.Optimizer, loss: Tensor, outputs: Tensor) -> None:
    """``loss.backward()``, through the optimizer's sampled backward for the MC Fisher."""
    if isinstance(optimizer, tekfac.KroneckerOptimizer):
        optimizer.backward(loss, outputs)
    else:
        loss.backward()
