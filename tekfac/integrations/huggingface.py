"""Hugging Face ``transformers`` models and their ``Trainer`` with tekfac.

A Hugging Face model computes its loss inside ``forward``: a causal language model shifts
the labels (position ``t`` predicts token ``t + 1``), flattens the logits to ``(N·T, V)``
and ignores the positions labelled ``-100``; a masked language model or token classifier
does the same without the shift. The MC Fisher must draw its labels in that same layout and
leave the ignored positions out (docs/design.md §1): :func:`causal_lm_outputs` and
:func:`token_outputs` give the ``(outputs, mask)`` to pass to
``optimizer.backward(loss, outputs, mask=mask)``.

GPT-2's projections (``transformers.pytorch_utils.Conv1D``) get Kronecker blocks like
``nn.Linear`` (:class:`tekfac.layers.TransposedLinearLayer`). Position embeddings called
on the default ``position_ids`` of shape ``(1, T)`` are broadcast over the batch, which no
Kronecker block can see per example: pass :func:`batch_position_ids` as ``position_ids``
(``TekfacTrainer(..., expand_position_ids=True)`` does).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

from tekfac.integrations import accelerate as accelerate_integration
from tekfac.integrations import unwrap_optimizer

__all__ = ["TekfacTrainer", "batch_position_ids", "causal_lm_outputs", "loss_outputs",
           "token_outputs"]


def causal_lm_outputs(logits: Tensor, labels: Tensor, ignore_index: int = -100
                      ) -> tuple[Tensor, Tensor]:
    """What a causal language model's loss (``ForCausalLMLoss``) reads: the logits
    ``(N, T, V)`` as ``(N·T, V)``, and the mask ``(N·T,)`` of the positions whose next token
    is a label (not ``ignore_index``; the last position of every sequence predicts
    nothing)."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return logits.reshape(-1, logits.shape[-1]), (shifted != ignore_index).reshape(-1)


def token_outputs(logits: Tensor, labels: Tensor, ignore_index: int = -100
                  ) -> tuple[Tensor, Tensor]:
    """What a masked language model's or token classifier's loss reads: the logits
    ``(N, T, V)`` as ``(N·T, V)``, and the mask ``(N·T,)`` of the labelled positions."""
    return logits.reshape(-1, logits.shape[-1]), (labels != ignore_index).reshape(-1)


def loss_outputs(model: nn.Module, logits: Tensor, labels: Tensor | None
                 ) -> tuple[Tensor, Tensor | None]:
    """``(outputs, mask)`` for the loss that ``model`` computes from ``logits`` and
    ``labels``: :func:`causal_lm_outputs` for a model whose ``loss_function`` is
    ``ForCausalLMLoss``, :func:`token_outputs` for other sequence logits ``(N, T, V)``, and
    the logits themselves (no mask) for one prediction per example (sequence
    classification)."""
    if logits.dim() < 3:
        return logits, None
    if labels is None:
        raise ValueError("The MC Fisher of a sequence model needs the batch's labels (to know "
                         "the positions the loss ignores); pass labels to the model")
    causal = getattr(getattr(model, "loss_function", None), "__name__", "") == "ForCausalLMLoss"
    return (causal_lm_outputs if causal else token_outputs)(logits, labels)


def batch_position_ids(input_ids: Tensor) -> Tensor:
    """``torch.arange(T)`` expanded to the leading dimensions of ``input_ids`` (``(N, T)``, or
    ``(N, C, T)`` for multiple choice): the positions that GPT-2 and BERT assume by default,
    one row per example, so that a position embedding sees each example."""
    t = input_ids.shape[-1]
    return torch.arange(t, device=input_ids.device).expand(input_ids.shape)


class TekfacTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a tekfac optimizer and either Fisher.

    Give it the optimizer as usual, ``optimizers=(optimizer, scheduler_or_None)``. Each
    training step's backward becomes ``optimizer.backward(loss, outputs, mask=mask)`` (with
    ``accelerate``'s scaling), the outputs and mask given by :meth:`loss_outputs`. Gradient
    accumulation works; fp16 mixed precision (a ``GradScaler``) is refused, bf16 needs none.

    ``expand_position_ids=True`` gives inputs with ``input_ids`` and no ``position_ids`` the
    positions :func:`batch_position_ids`: for models whose default positions are
    ``arange(T)`` shared by the batch (GPT-2, BERT), which tekfac refuses otherwise. Leave it
    off for models that number positions their own way (RoBERTa counts from its padding
    index) or have no position embedding (Llama).

    The Trainer clips the gradient norm to ``max_grad_norm`` (default 1.0) before the step,
    which rescales the gradient that the curvature preconditions; tekfac's own bound on the
    step is ``kl_clip``. A warning says so unless ``max_grad_norm=0``.
    """

    def __init__(self, *args: Any, expand_position_ids: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.expand_position_ids = expand_position_ids
        if self.optimizer is None:
            raise ValueError("TekfacTrainer needs the tekfac optimizer: pass "
                             "optimizers=(tekfac.TEKFAC(model, ...), None)")
        if self.accelerator.scaler is not None:
            raise ValueError("TekfacTrainer does not support fp16 mixed precision (its "
                             "GradScaler is made after the optimizer); use bf16=True, or a "
                             "plain loop with tekfac.TEKFAC(..., grad_scaler=scaler)")
        if unwrap_optimizer(self.optimizer).damping_adaptation is not None:
            raise ValueError("damping_adaptive=True needs step(closure), which the Trainer does "
                             "not give: build the optimizer without it (the Trainer calls "
                             "optimizer.step())")
        if self.args.max_grad_norm:
            warnings.warn(
                f"TrainingArguments.max_grad_norm={self.args.max_grad_norm} clips the gradient "
                "before the Kronecker-factored step, which changes the gradient that the "
                "curvature preconditions; tekfac bounds the step with kl_clip. Pass "
                "max_grad_norm=0 to leave the gradient as it is", stacklevel=2)
        self._loss_outputs: tuple[Tensor, Tensor | None] | None = None

    def loss_outputs(self, model: nn.Module, outputs: Mapping[str, Tensor],
                     inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The ``(outputs, mask)`` of the model's loss (see :func:`loss_outputs`); override
        for a model whose loss reads other outputs."""
        return loss_outputs(model, outputs["logits"], inputs.get("labels"))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Any:
        if (self.expand_position_ids and "input_ids" in inputs and "position_ids" not in inputs
                and _accepts(self.accelerator.unwrap_model(model), "position_ids")):
            inputs = {**inputs, "position_ids": batch_position_ids(inputs["input_ids"])}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training:
            self._loss_outputs = self.loss_outputs(self.accelerator.unwrap_model(model),
                                                   outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        accelerator = self.accelerator

        def backward(loss: Tensor, **kwargs: Any) -> None:
            if self._loss_outputs is None:
                raise RuntimeError("TekfacTrainer: the backward came before compute_loss")
            outputs, mask = self._loss_outputs
            self._loss_outputs = None
            accelerate_integration.backward(accelerator, self.optimizer, loss, outputs,
                                            mask=mask, **kwargs)

        accelerator.backward = backward  # this step's backward only
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del accelerator.backward


def _accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument``."""
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
