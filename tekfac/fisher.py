"""Monte-Carlo sampling of labels for the true Fisher (DESIGN.md §1).

For the Fisher of a loss ``-log p(y | f(x))`` the expectation over ``y ~ p(y | f(x))`` of
``∇l ∇l^T`` is the true Fisher. Each supported loss fixes its distribution exactly:

* ``"cross_entropy"``: categorical over dim 1 of the logits ``(N, C, ...)``;
* ``"mse"``: Gaussian with mean ``f`` and variance ½ (``nn.MSELoss`` has no ½ factor, so
  ``(y - f)^2 = -log N(y; f, ½) + const``);
* ``"bce_with_logits"``: Bernoulli with probability ``sigmoid(f)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_targets(loss: str, outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Draw targets ``y ~ p(y | outputs)`` for ``loss``; no gradient flows through them."""
    f = outputs.detach()
    if loss == "cross_entropy":
        probs = torch.softmax(f.float(), dim=1).movedim(1, -1)
        flat = probs.reshape(-1, probs.shape[-1])
        labels = torch.multinomial(flat, 1, generator=generator)
        return labels.reshape(probs.shape[:-1])
    if loss == "mse":
        noise = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
        return f + math.sqrt(0.5) * noise
    if loss == "bce_with_logits":
        return torch.bernoulli(torch.sigmoid(f), generator=generator)
    raise ValueError(f"Invalid loss: {loss!r}")


def sampled_loss(loss: str, outputs: Tensor, targets: Tensor, reduction: str) -> Tensor:
    """The training loss evaluated at sampled targets, with the given batch reduction."""
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction=reduction)
    if loss == "mse":
        return F.mse_loss(outputs, targets, reduction=reduction)
    return F.binary_cross_entropy_with_logits(outputs, targets, reduction=reduction)
