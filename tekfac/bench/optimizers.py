"""The six optimizers of the comparison, built from per-task hyper-parameters.

Shared by all: the task's weight decay (coupled L2), a cosine learning-rate schedule over the
whole run (one step per minibatch), and, for SGD and the four Kronecker methods, momentum 0.9.
The Kronecker methods use the MC Fisher, KL clipping 1e-3, ``stat_decay`` 0.95 and statistics
every 10 / eigenbases every 100 / corrected scalings every 10 steps (docs/design.md §6); the tuned
hyper-parameters are the learning rate and, for them, the damping.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import tekfac

#: The Kronecker methods: every method of the library (kfac, ekfac, tkfac, tekfac).
SECOND_ORDER = tuple(tekfac.METHODS)
#: Every optimizer of the comparison: the two first-order baselines, then the Kronecker methods.
OPTIMIZERS = ("sgd", "adam", *SECOND_ORDER)

#: Used when a task has no tuned configuration (see ``tekfac/bench/tuned/``); the values
#: docs/design.md §6 measured on the Fashion-MNIST CNN.
DEFAULT_HPARAMS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.05},
    "adam": {"lr": 1e-3},
    **{m: {"lr": 0.01, "damping": 0.1} for m in SECOND_ORDER},
}

KRONECKER_SETTINGS = dict(momentum=0.9, kl_clip=1e-3, stat_decay=0.95, cov_update_freq=10,
                          eigen_update_freq=100, scale_update_freq=10, fisher="mc")


def make_optimizer(name: str, model: nn.Module, hparams: dict[str, float], loss: str,
                   weight_decay: float, **options: object) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; ``hparams`` holds ``lr`` (and ``damping``);
    ``options`` go to the Kronecker methods (e.g. ``distributed_mode``)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=hparams["lr"], momentum=0.9,
                               weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=hparams["lr"], weight_decay=weight_decay)
    if name in SECOND_ORDER:
        return tekfac.KroneckerOptimizer(model, name, lr=hparams["lr"],
                                         damping=hparams["damping"], loss=loss,
                                         weight_decay=weight_decay,
                                         **{**KRONECKER_SETTINGS, **options})
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    """``lr_t = lr · (1 + cos(π t / total)) / 2``, stepped once per minibatch."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps)))


def backward(optimizer: torch.optim.Optimizer, loss: Tensor, outputs: Tensor) -> None:
    """``loss.backward()``, through the optimizer's sampled backward for the MC Fisher."""
    if isinstance(optimizer, tekfac.KroneckerOptimizer):
        optimizer.backward(loss, outputs)
    else:
        loss.backward()
