"""How the statistics get their output gradients: the two Fisher kinds (docs/design.md §1).

* ``"empirical"``: the gradients of the user's own loss, recorded by hooks during
  ``loss.backward()``;
* ``"mc"`` (the true Fisher): on statistics steps, labels ``y ~ p(y | f(x))`` are sampled from
  the model's predictive distribution and an extra backward of that loss records the output
  gradients. The expectation over ``y`` of ``∇l ∇l^T`` is the true Fisher of ``-log p(y|f(x))``.

Each supported loss fixes its distribution exactly (:data:`LIKELIHOODS`):

* ``"cross_entropy"``: categorical over dim 1 of the logits ``(N, C, ...)``;
* ``"nll"``: the same categorical for a model that ends in ``log_softmax``: ``F.nll_loss`` of
  log-probabilities ``(N, C, ...)``, whose ``exp`` are the probabilities;
* ``"mse"``: Gaussian with mean ``f`` and variance ½ (``nn.MSELoss`` has no ½ factor, so
  ``(y - f)^2 = -log N(y; f, ½) + const``);
* ``"bce_with_logits"``: Bernoulli with probability ``sigmoid(f)``.

A Fisher kind also owns what both need to turn recorded gradients into per-example gradients
of the unscaled loss: the batch-mean convention and a ``torch.amp.GradScaler``'s scale.
:data:`FISHER_KINDS` is the registry; a new kind is one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from tekfac.capture import Capture
    from tekfac.records import Call


class Likelihood(NamedTuple):
    """A loss as a negative log-likelihood: a sampler of targets, the loss itself, the
    Fisher of the outputs, and whether the outputs have a class axis (dimension 1, or 0 for
    one unbatched example).

    ``fisher_form(f, a, b)`` is ``Σ aᵀ F_f b`` summed over the terms (examples, positions,
    pixels) of outputs ``f``, ``F_f = E_y[∇_f l ∇_f lᵀ]`` the Fisher of one term's
    distribution w.r.t. its outputs, which for these losses is also the Hessian of ``l`` in
    ``f`` (so that ``Jᵀ F_f J`` is the generalised Gauss–Newton matrix; for ``"nll"`` the two
    agree along every direction that keeps the log-probabilities normalised)."""

    sample: Callable[[Tensor, torch.Generator], Tensor]
    loss: Callable[..., Tensor]
    fisher_form: Callable[[Tensor, Tensor, Tensor], Tensor]
    class_axis: bool = False


def _categorical(f: Tensor, generator: torch.Generator) -> Tensor:
    """One label per position from the softmax of the logits ``f`` along the class axis."""
    return _draw(torch.softmax(f.float(), dim=_class_dim(f)), generator)


def _categorical_log(f: Tensor, generator: torch.Generator) -> Tensor:
    """One label per position from the log-probabilities ``f`` along the class axis."""
    return _draw(f.float().exp(), generator)


def _draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One label per position along the class axis of (unnormalised) probabilities."""
    probs = probs.movedim(_class_dim(probs), -1)
    flat = probs.reshape(-1, probs.shape[-1])
    # a position with non-finite outputs (or log-probabilities all -inf) draws from the
    # uniform distribution instead of raising: its loss, hence its gradient, is non-finite
    # anyway, and the step is skipped
    valid = flat.isfinite().all(dim=1, keepdim=True) & (flat.sum(dim=1, keepdim=True) > 0)
    flat = torch.where(valid, flat, 1.0 / flat.shape[1])
    labels = torch.multinomial(flat, 1, generator=generator)
    return labels.reshape(probs.shape[:-1])


def _class_dim(outputs: Tensor) -> int:
    """The class axis as ``F.cross_entropy`` and ``F.nll_loss`` read it: 1, or 0 for
    ``(C,)``."""
    return 1 if outputs.dim() > 1 else 0


def _categorical_form(f: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``Σ aᵀ (diag p − p pᵀ) b`` over positions, ``p`` the softmax of the logits."""
    dim = _class_dim(f)
    p = torch.softmax(f, dim=dim)
    return (p * a * b).sum() - ((p * a).sum(dim) * (p * b).sum(dim)).sum()


def _categorical_log_form(f: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``Σ aᵀ diag(p) b``, ``p = exp f`` for log-probabilities ``f``."""
    return (f.exp() * a * b).sum()


def _gaussian_form(f: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``Σ 2 a b``: the Fisher (and Hessian) of ``(y − f)²`` is 2."""
    return 2 * (a * b).sum()


def _bernoulli_form(f: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``Σ σ(f)(1 − σ(f)) a b``."""
    p = torch.sigmoid(f)
    return (p * (1 - p) * a * b).sum()


def _gaussian(f: Tensor, generator: torch.Generator) -> Tensor:
    noise = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
    return f + math.sqrt(0.5) * noise


def _bernoulli(f: Tensor, generator: torch.Generator) -> Tensor:
    return torch.bernoulli(torch.sigmoid(f).nan_to_num(0.5), generator=generator)


#: Loss name → its likelihood (the MC sampling distribution).
LIKELIHOODS: dict[str, Likelihood] = {
    "cross_entropy": Likelihood(_categorical, F.cross_entropy, _categorical_form,
                                class_axis=True),
    "nll": Likelihood(_categorical_log, F.nll_loss, _categorical_log_form, class_axis=True),
    "mse": Likelihood(_gaussian, F.mse_loss, _gaussian_form),
    "bce_with_logits": Likelihood(_bernoulli, F.binary_cross_entropy_with_logits,
                                  _bernoulli_form),
}


def check_layout(loss: str, outputs: Tensor, width: int) -> None:
    """Refuse ``outputs`` whose class axis cannot be the loss's, given ``width``, the output
    width of the last tracked layer that made them: logits ``(N, T, V)`` whose last axis, not
    dimension 1, has the layer's ``V`` classes (the loss was given another view of them)."""
    if not LIKELIHOODS[loss].class_axis or outputs.dim() < 3:
        return
    if outputs.shape[1] != width and outputs.shape[-1] == width:
        raise ValueError(
            f"optimizer.backward got outputs of shape {tuple(outputs.shape)}, whose class axis "
            f"(dimension 1, as F.cross_entropy and F.nll_loss read it) has {outputs.shape[1]} "
            f"entries, while the last tracked layer gives {width} per position: pass exactly the "
            "tensor given to the loss, e.g. logits.view(-1, logits.shape[-1]) or "
            "logits.transpose(1, -1)")


def check_mask(loss: str, outputs: Tensor, mask: Tensor | None) -> None:
    """Refuse a ``mask`` that is not a boolean tensor of the shape of ``outputs``' loss
    terms (the outputs' shape without the class axis for the categorical losses)."""
    if mask is None:
        return
    expected = terms_shape(loss, outputs.shape)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != expected:
        got = (f"a {mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor)
               else type(mask).__name__)
        raise ValueError(
            f"Invalid mask: expected a torch.bool tensor of shape {tuple(expected)} (one entry "
            f"per loss term of outputs of shape {tuple(outputs.shape)}, True where the term "
            f"enters the loss), got {got}; for labels with an ignore_index use "
            "mask=(labels != ignore_index)")


def terms_shape(loss: str, outputs_shape: torch.Size) -> torch.Size:
    """The shape of the loss's terms for outputs of ``outputs_shape``: without the class axis
    (dimension 1, or 0 for one unbatched example) for the categorical losses."""
    if not LIKELIHOODS[loss].class_axis:
        return outputs_shape
    dim = 1 if len(outputs_shape) > 1 else 0
    return outputs_shape[:dim] + outputs_shape[dim + 1:]


def num_terms(loss: str, outputs_shape: torch.Size, mask: Tensor | None) -> int | Tensor:
    """The loss terms that enter the loss: the kept entries of ``mask`` (a 0-dim tensor, so
    that counting needs no host synchronisation), else all."""
    return mask.sum() if mask is not None else terms_shape(loss, outputs_shape).numel()


class StepLoss:
    """What the backward calls of a step saw of the user's loss: its terms and examples, for
    ``c`` (:meth:`FisherKind.curvature_multiplier`: ``K = Σ terms / Σ examples`` over all
    micro-batches, the terms kept by their masks), and whether it or the outputs were finite.
    """

    def __init__(self, loss: str):
        self.loss = loss
        self._calls: list[tuple[int | Tensor, int]] = []
        self._step = -1
        self._total: tuple[float, int] | None = None  # the calls' sums, once read
        #: a 0-dim bool tensor: a loss or outputs of this step held NaN or Inf (None: no call)
        self.bad: Tensor | None = None

    def add(self, step: int, loss: Tensor, outputs: Tensor, mask: Tensor | None,
            examples: int) -> None:
        """Count one backward call of step ``step`` (the first of a step forgets the last's)."""
        if self._step != step:
            self._calls, self._step = [], step
        self._calls.append((num_terms(self.loss, outputs.shape, mask), examples))
        self._total = None
        bad = ~(torch.isfinite(loss.detach()).all() & torch.isfinite(outputs.detach()).all())
        self.bad = bad if self.bad is None else self.bad | bad

    def clear(self) -> None:
        """Forget the current step's calls (a skipped step)."""
        self._calls, self.bad, self._total = [], None, None

    def multiplier(self, step: int, fisher: FisherKind, capture: Capture) -> float:
        """``c`` of step ``step`` (or of the step before it, which ``step`` follows once the
        curvature is updated). Without a call of the optimizer's backward (a plain
        ``loss.backward()``) the loss is taken to be computed from the output of the latest
        tracked layer called (its class axis, for the categorical losses, is that layer's
        output features or channels), on that call's examples."""
        if capture.examples is None:
            raise RuntimeError("The curvature of the loss needs a forward pass of the model "
                               "first")
        if self._calls and self._step >= step - 1:
            if self._total is None:  # one host synchronisation a step, however often read
                self._total = (float(sum(t for t, _ in self._calls)),
                               sum(n for _, n in self._calls))
            terms, examples = self._total
        else:
            shape = torch.Size((capture.examples, capture.width, capture.positions))
            terms, examples = num_terms(self.loss, shape, None), capture.examples
        return fisher.curvature_multiplier(float(terms), examples)


def masked_terms(loss: str, outputs: Tensor, mask: Tensor | None) -> Tensor:
    """``outputs`` with every entry of a term outside ``mask`` set to zero (a direction that
    moves those outputs changes no term of the loss)."""
    if mask is None:
        return outputs
    if LIKELIHOODS[loss].class_axis:
        mask = mask.unsqueeze(1 if outputs.dim() > 1 else 0)
    return outputs * mask


def sample_targets(loss: str, outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Draw targets ``y ~ p(y | outputs)`` for ``loss``; no gradient flows through them."""
    return LIKELIHOODS[loss].sample(outputs.detach(), generator)


def sampled_loss(loss: str, outputs: Tensor, targets: Tensor, reduction: str,
                 mask: Tensor | None = None) -> Tensor:
    """The training loss evaluated at sampled targets, with the given batch reduction, over
    the terms in ``mask`` only if given (the mean then divides by their count, as
    ``ignore_index`` does)."""
    likelihood = LIKELIHOODS[loss]
    if mask is None:
        return likelihood.loss(outputs, targets, reduction=reduction)
    per_term = likelihood.loss(outputs, targets, reduction="none")
    total = torch.where(mask, per_term, 0.0).sum()  # no NaN from an ignored term's outputs
    # a micro-batch without a kept term adds zero gradients, not 0/0
    return total / mask.sum().clamp_min(1) if reduction == "mean" else total


class FisherKind:
    """The output gradients of one preconditioner's statistics.

    Args:
        loss: a :data:`LIKELIHOODS` name.
        reduction: ``"mean"`` or ``"sum"``: how the training loss reduces over the batch.
        seed: seed of the MC label sampler.
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any.
        rank: this process's rank (ranks draw different labels).

    Attributes:
        samples: whether the output gradients come from a sampled backward (so that the
            capture keeps gradient edges instead of hooking the user's backward).
    """

    samples = False

    def __init__(self, loss: str, reduction: str, seed: int,
                 grad_scaler: torch.amp.GradScaler | None = None, rank: int = 0):
        self.loss, self.reduction, self.seed = loss, reduction, seed
        self.grad_scaler, self.rank = grad_scaler, rank

    def loss_scale(self) -> float:
        """The GradScaler's current scale (the one the last backward used), else 1."""
        scaler = self.grad_scaler
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0

    def grad_multiplier(self, num_examples: int) -> float:
        """What the recorded output gradients are multiplied by to be per-example gradients
        of the unscaled loss, for a step of ``num_examples`` examples."""
        raise NotImplementedError

    def curvature_multiplier(self, terms: float, num_examples: int) -> float:
        """``c`` such that ``c·F̂`` is the curvature of the loss as the user reduced it, for a
        batch of ``num_examples`` examples whose loss has ``terms`` terms (docs/design.md §1,
        §3; :func:`num_terms`).

        The per-example loss ``l_i`` of the design is a mean of ``K`` terms (positions,
        pixels: ``K = terms / N``, the terms that enter the loss per example), so
        ``F̂ ≈ E_i[J_iᵀ H J_i] / K²``, while the Hessian of ``l_i`` is ``Σ J_iᵀ H J_i / K``:
        ``c = K`` for a batch mean, whose curvature is the mean over examples; ``c = N`` for a
        batch sum (``l_i`` then sums its terms). A step without a kept term (whose gradient
        is zero) counts as one."""
        if self.reduction == "sum":
            return float(num_examples)
        return max(terms, 1.0) / num_examples

    def record(self, outputs: Tensor, calls: Sequence[Call], step: int, width: int,
               mask: Tensor | None = None) -> None:
        """Record the output gradients of ``calls`` before the user's backward, if this kind
        needs to; ``width`` is the output width of the last tracked layer called, ``mask``
        the loss terms that enter the loss (``None``: all)."""

    def check_recorded(self, has_calls: bool) -> None:
        """Raise if the statistics of a step with ``has_calls`` lack their gradients."""

    def end_step(self) -> None:
        """Forget this step's bookkeeping."""


class EmpiricalFisher(FisherKind):
    """The gradients of the user's loss: for a batch mean they are per-example gradients
    divided by ``N``, hence multiplied back by ``N``."""

    def grad_multiplier(self, num_examples: int) -> float:
        per_example = num_examples if self.reduction == "mean" else 1
        return per_example / self.loss_scale()


class MonteCarloFisher(FisherKind):
    """The true Fisher: a backward of the loss at labels sampled from ``outputs`` (one label
    per position along the class axis), scaled like the user's loss. For a batch mean each
    call's gradients are multiplied by its own example count, the leading dimension of the
    layer's input (docs/design.md §4b), never by the rows of ``outputs``: they are
    per-example gradients whatever the layout of ``outputs``. The most common count is
    applied to the sampled loss (free); a call with another count is rescaled."""

    samples = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._micro_batches = 0
        self._sampled = False

    def grad_multiplier(self, num_examples: int) -> float:
        return 1 / self.loss_scale()

    def record(self, outputs: Tensor, calls: Sequence[Call], step: int, width: int,
               mask: Tensor | None = None) -> None:
        """Differentiate the loss at ``y ~ p(y | outputs)`` (times the loss scale) w.r.t. the
        calls' output edges, keeping the graph for the user's backward. Terms outside
        ``mask`` (``ignore_index`` positions) are left out of the sampled loss, so they add
        no gradient to the statistics."""
        if not calls:
            return
        check_layout(self.loss, outputs, width)
        targets = sample_targets(self.loss, outputs, self.generator(outputs.device, step))
        sampled = sampled_loss(self.loss, outputs, targets, self.reduction, mask)
        sampled = sampled * self.loss_scale()
        counts = [call.num_examples for call in calls]
        n = max(set(counts), key=counts.count) if self.reduction == "mean" else 1
        grads = torch.autograd.grad(sampled * n, [call.edge for call in calls],
                                    retain_graph=True, allow_unused=True)
        for call, grad, count in zip(calls, grads, counts):
            call.edge = None
            if grad is not None:
                call.receive(grad if self.reduction == "sum" or count == n else grad * (count / n))
        self._sampled = True

    def check_recorded(self, has_calls: bool) -> None:
        if has_calls and not self._sampled:
            raise RuntimeError(
                "fisher='mc' needs the sampled backward on statistics steps: replace "
                "loss.backward() by optimizer.backward(loss, outputs) (or pass fisher='empirical')")

    def end_step(self) -> None:
        self._sampled = False
        self._micro_batches = 0

    def generator(self, device: torch.device, step: int) -> torch.Generator:
        """The sampler of the next micro-batch, seeded from (seed, step, rank, micro-batch): a
        pure function of the step counter, so checkpoints need no RNG state and ranks draw
        different labels."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        entropy = [self.seed, step, self.rank, self._micro_batches]
        gen.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
                            >> np.uint64(1)))
        self._micro_batches += 1
        return gen


#: Fisher kind name → implementation.
FISHER_KINDS: dict[str, type[FisherKind]] = {"mc": MonteCarloFisher, "empirical": EmpiricalFisher}
