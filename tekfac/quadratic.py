"""The quadratic-model step rule (Martens & Grosse 2015, §7; docs/design.md §4.7).

A step moves the parameters by ``s = −(α v₁ + μ v₂)``: ``v₁`` the preconditioned direction
(``Δ`` for the tracked layers, the raw gradient for every other parameter, both with their
coupled decay), ``v₂`` the previous update ``u``. ``w = (α, μ)`` minimises the damped quadratic
model of the objective ``h = L + Σ_p η_p ‖θ_p‖² / 2`` (``η_p``: ``p``'s coupled decay),

.. math::
    M(s) = ∇h^T s + ½ s^T (C + \\operatorname{diag}(η) + \\operatorname{diag}(λ)) s,

``C`` the exact curvature of the loss ``L`` as the user reduced it and ``λ_p`` the damping of
``p``'s block: ``(A + R + Λ) w = b`` with

.. math::
    A_{ij} = v_i^T C v_j, \\quad R_{ij} = Σ_p η_p ⟨v_{ip}, v_{jp}⟩, \\quad
    Λ_{ij} = Σ_p λ_p ⟨v_{ip}, v_{jp}⟩, \\quad b_i = ⟨∇h, v_i⟩.

``C = Jᵀ F_f J`` is the Fisher of the loss's predictive distribution (for every supported loss
the generalised Gauss–Newton matrix), ``J`` the Jacobian of the model's outputs ``f`` w.r.t. the
parameters and ``F_f`` the outputs' Fisher (:attr:`tekfac.fisher.Likelihood.fisher_form`).
``J v`` is exact, by double backward through the retained graph of ``f``:
``J v = ∂⟨Jᵀ z, v⟩ / ∂z`` at ``z = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tekfac.fisher import LIKELIHOODS, masked_terms, num_terms


def jacobian_products(outputs: Tensor, params: Sequence[Tensor],
                      vectors: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """``J v`` (shaped like ``outputs``) for each of ``vectors`` (one tensor per parameter of
    ``params``), through the graph of ``outputs``, which must still be alive and is kept.
    ``RuntimeError`` saying what to do when an operation of the model has no double backward
    (``scaled_dot_product_attention``'s fused CPU and GPU kernels, a ``torch.compile``-d
    model)."""
    try:
        return _jacobian_products(outputs, params, vectors)
    except RuntimeError as e:
        message = str(e)
        if not (("derivative for" in message and "not implemented" in message)
                or "support double backward" in message):  # torch.compile's wording
            raise
        raise RuntimeError(
            "step_rule='quadratic' differentiates the backward pass (its curvature products "
            f"are double backward), which an operation of the model does not support: {e}. "
            "For F.scaled_dot_product_attention run the forward under "
            "torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH); otherwise use "
            "step_rule='fixed'") from e


def _jacobian_products(outputs: Tensor, params: Sequence[Tensor],
                       vectors: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    z = torch.zeros_like(outputs, requires_grad=True)
    transposed = torch.autograd.grad(outputs, params, grad_outputs=z, create_graph=True,
                                     allow_unused=True)
    used = [(t, i) for i, t in enumerate(transposed) if t is not None and t.requires_grad]
    products = []
    for k, vector in enumerate(vectors):
        if not used:
            products.append(torch.zeros_like(outputs))
            continue
        inner = sum((t * vector[i]).sum() for t, i in used)
        (product,) = torch.autograd.grad(inner, z, retain_graph=k < len(vectors) - 1,
                                         allow_unused=True)
        products.append(torch.zeros_like(outputs) if product is None else product.detach())
    return products


def output_gram(loss: str, reduction: str, outputs: Tensor, products: Sequence[Tensor],
                mask: Tensor | None = None) -> Tensor:
    """``[(J v_i)ᵀ F_f (J v_j)]`` for the loss as reduced (``"mean"`` over its terms, the
    outputs' entries without their class axis, or ``"sum"``), over the terms in ``mask``
    only if given; ``(k, k)`` in float64."""
    likelihood = LIKELIHOODS[loss]
    f = outputs.detach().double()
    jv = [masked_terms(loss, p.double(), mask) for p in products]
    terms = float(num_terms(loss, f.shape, mask))
    scale = 1.0 / max(terms, 1.0) if reduction == "mean" else 1.0
    k = len(jv)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            gram[i, j] = gram[j, i] = likelihood.fisher_form(f, jv[i], jv[j]).cpu() * scale
    return gram


def curvature_gram(loss: str, reduction: str, graphs: Sequence[tuple[Tensor, Tensor | None]],
                   params: Sequence[Tensor], vectors: Sequence[Sequence[Tensor]]) -> Tensor:
    """``A = [v_iᵀ C v_j]`` (``(k, k)``, float64) for the loss whose micro-batch outputs (and
    masks of their terms) are ``graphs``: with ``"mean"`` the loss is the mean of the
    micro-batches' (each given to the backward divided by their number), with ``"sum"``
    their sum."""
    total = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for outputs, mask in graphs:
        total += output_gram(loss, reduction, outputs,
                             jacobian_products(outputs, params, vectors), mask)
    return total / len(graphs) if reduction == "mean" and graphs else total


def weighted_grams(vectors: Sequence[Sequence[Tensor]], weights: Sequence[Sequence[float]]
                   ) -> list[Tensor]:
    """``[Σ_p w_p ⟨v_ip, v_jp⟩]`` (``(k, k)``, float64) for each list ``w`` of per-parameter
    weights in ``weights``: every inner product is computed once, and each entry reaches the
    host once for all the lists."""
    k = len(vectors)
    grams = [torch.zeros(k, k, dtype=torch.float64) for _ in weights]
    if not vectors or not vectors[0]:
        return grams
    device = vectors[0][0].device
    table = torch.tensor(weights, dtype=torch.float64, device=device)  # (lists, parameters)
    for i in range(k):
        for j in range(i, k):
            products = torch.stack([torch.vdot(a.reshape(-1).double(), b.reshape(-1).double())
                                    for a, b in zip(vectors[i], vectors[j])])
            for gram, value in zip(grams, (table @ products).cpu()):
                gram[i, j] = gram[j, i] = value
    return grams


def inner_products(grads: Sequence[Tensor], vectors: Sequence[Sequence[Tensor]]) -> Tensor:
    """``b = [⟨∇, v_i⟩]`` (``(k,)``, float64)."""
    if not grads:
        return torch.zeros(len(vectors), dtype=torch.float64)
    return torch.stack([
        torch.stack([torch.vdot(g.reshape(-1).double(), v.reshape(-1).double())
                     for g, v in zip(grads, vector)]).sum() for vector in vectors]).cpu()


def solve(matrix: Tensor, b: Tensor) -> Tensor:
    """The minimiser ``w = matrix⁻¹ b`` of ``−wᵀb + ½ wᵀ matrix w`` for a positive
    semi-definite ``(k, k)`` matrix, ``k ≤ 2``. When the second vector adds nothing (its
    diagonal entry is 0, or the system is singular: the previous update is zero or parallel to
    the direction) its coefficient is 0 and the first is solved alone; a zero first diagonal
    entry gives ``α = 0``."""
    w = torch.zeros_like(b)
    if len(b) == 2 and matrix[1, 1] > 0:
        det = matrix[0, 0] * matrix[1, 1] - matrix[0, 1] ** 2
        if det > 1e-12 * matrix[0, 0] * matrix[1, 1]:
            return torch.linalg.solve(matrix, b)
    if matrix[0, 0] > 0:
        w[0] = b[0] / matrix[0, 0]
    return w


def model_change(curvature: Tensor, b: Tensor, w: Tensor) -> float:
    """The quadratic model's change ``−wᵀb + ½ wᵀ A w`` at the step ``s = −Σ w_i v_i``."""
    return float(-w @ b + 0.5 * w @ curvature @ w)
