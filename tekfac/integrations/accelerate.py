"""``accelerate`` with tekfac: :func:`backward` in place of ``accelerator.backward(loss)``.

``accelerator.prepare(model, optimizer, loader)`` works as usual: build the tekfac optimizer
on the model first (on the ``DistributedDataParallel`` model or the bare one, see
:class:`tekfac.KroneckerOptimizer`); ``prepare`` wraps it, and :func:`backward` reaches it
through the wrapper. Under ``accelerator.accumulate(model)`` the loss is divided by the
accumulation steps exactly as ``accelerator.backward`` does, so that the micro-batches'
losses sum to the full batch's mean; the MC statistics of every micro-batch are folded in
(docs/design.md §4b).
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor
from torch.optim import Optimizer

from tekfac.integrations import unwrap_optimizer

__all__ = ["backward"]

#: accelerate's engines that tekfac supports: one process and data parallelism.
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def backward(accelerator: Accelerator, optimizer: Optimizer, loss: Tensor, outputs: Tensor,
             mask: Tensor | None = None, **kwargs: Any) -> None:
    """``accelerator.backward(loss)`` for a tekfac optimizer: the loss divided by the
    gradient accumulation steps, scaled by the accelerator's ``GradScaler`` if it has one (give
    the optimizer ``grad_scaler=accelerator.scaler``), then
    ``optimizer.backward(loss, outputs, mask=mask)``.

    Raises:
        ValueError: for the engines not in :data:`SUPPORTED`; for an accelerator's
            ``GradScaler`` that the optimizer was not given.
        TypeError: for keyword arguments (``accelerator.backward`` passes them to
            ``loss.backward``, which tekfac calls itself).
    """
    opt = unwrap_optimizer(optimizer)
    if kwargs:
        raise TypeError(f"tekfac's backward takes no loss.backward() arguments, got "
                        f"{sorted(kwargs)}")
    if accelerator.distributed_type not in SUPPORTED:
        raise ValueError(f"tekfac does not support accelerate's {accelerator.distributed_type} "
                         "(DeepSpeed and Megatron-LM run their own backward and optimizer; "
                         "sharded parameters, FSDP, are not supported yet); it supports one "
                         "process and data parallelism (NO, MULTI_CPU, MULTI_GPU)")
    loss = loss / accelerator.gradient_accumulation_steps
    scaler = accelerator.scaler
    if scaler is not None:
        if opt.preconditioner.fisher.grad_scaler is not scaler:
            raise ValueError("The accelerator scales the loss with a GradScaler that the "
                             "optimizer does not know: build it with "
                             "grad_scaler=accelerator.scaler")
        loss = scaler.scale(loss)
    opt.backward(loss, outputs, mask=mask)
