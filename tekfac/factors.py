"""The two factor kinds that give the Kronecker-factored eigenbasis (DESIGN.md §2(a)).

Inputs are the examples of a layer in one forward (:class:`tekfac.capture.Examples`): their
patches ``a`` of shape ``(N, T, d_in)`` (only ever unfolded piece by piece, or not at all) and
per-example output gradients ``g`` of shape ``(N, T, d_out)`` (see :mod:`tekfac.layers`).
Each kind gives the
batch estimate of an input-side factor ``(d_in, d_in)``, an output-side factor
``(d_out, d_out)`` and a scalar scale ``δ`` such that its Kronecker approximation is
``F̂ = δ · out ⊗ in`` (``δ = 1`` for KFAC). Every statistic is a mean over examples, so the
estimates of several batches or ranks combine by a weighted average before ``finalize``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tekfac.capture import Examples

#: Largest number of elements of a layer's patches, of per-example gradients, or of a
#: convolution's gathered input rows (``Y`` of :mod:`tekfac.patch_moments`) materialised at once.
CHUNK_ELEMENTS = 1 << 20


class FactorStatistics(NamedTuple):
    """One batch's factors: ``factor_in (d_in, d_in)``, ``factor_out (d_out, d_out)``,
    ``scale`` (0-dim, ``δ``)."""

    factor_in: Tensor
    factor_out: Tensor
    scale: Tensor


def kronecker_factors(ex: Examples, with_scale: bool = True) -> FactorStatistics:
    """KFAC / KFC factors (``with_scale`` has no effect: ``δ = 1``).

    .. math:: A = \\frac{1}{N T} \\sum_i A_i A_i^T, \\quad G = \\frac{1}{N} \\sum_i G_i G_i^T,
              \\quad δ = 1.
    """
    n, t = ex.g.shape[:2]
    return FactorStatistics(ex.input_moment() / (n * t), _gram(ex.g) / n, ex.g.new_ones(()))


def trace_restricted_factors(ex: Examples, with_scale: bool = True) -> FactorStatistics:
    r"""TKFAC factors (Gao et al. 2020) before normalisation (see :func:`unit_trace_factors`).

    With ``Λ_i = A_i A_i^T`` and ``Γ_i = G_i G_i^T``:

    .. math:: Φ ∝ E[\operatorname{tr}(Γ_i) Λ_i], \quad Ψ ∝ E[\operatorname{tr}(Λ_i) Γ_i],
              \quad δ = E[\|G_i A_i^T\|_F^2] = \operatorname{tr} F,

    so that, once ``Φ`` and ``Ψ`` have trace one, ``tr(δ Ψ ⊗ Φ) = tr F``. For ``T = 1``
    (Linear) ``δ = E[tr Λ_i tr Γ_i]``. The factors are returned as batch means so that batches
    (or ranks) can be averaged before normalising. ``with_scale=False`` returns ``δ = 1``
    instead, skipping its per-example norms: TEKFAC's corrected scaling replaces ``δ``.
    """
    n = ex.n
    tr_a = ex.input_sq_norms()  # (N,) tr Λ_i
    tr_g = torch.linalg.vector_norm(ex.g, dim=(1, 2)).square()  # (N,) tr Γ_i
    phi = ex.input_moment(tr_g) / n
    psi = _gram(ex.g, tr_a) / n
    if not with_scale:
        return FactorStatistics(phi, psi, phi.new_ones(()))
    delta = example_sq_norms(ex).sum() / n
    return FactorStatistics(phi, psi, delta)


def unit_trace_factors(stats: FactorStatistics) -> FactorStatistics:
    """Normalise the trace-restricted factors to trace one (``δ`` unchanged)."""
    return FactorStatistics(_unit_trace(stats.factor_in), _unit_trace(stats.factor_out),
                            stats.scale)


def _gram(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """``Σ_i w_i X_i^T X_i`` for ``x`` of shape ``(N, T, d)``; shape ``(d, d)``. One product over
    the ``N·T`` rows; but when ``x`` is the transposed view of a contiguous ``(N, d, T)`` (a
    convolution's output gradients) with ``T ≥ d``, one product per example, which copies
    nothing and whose ``(N, d, d)`` results are at most the size of ``x``."""
    t, d = x.shape[1:]
    if t >= d and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        per_example = torch.bmm(x.transpose(1, 2), x)
        return per_example.sum(dim=0) if weights is None else torch.tensordot(weights,
                                                                               per_example, 1)
    weighted = x if weights is None else x * weights[:, None, None]
    return weighted.reshape(-1, d).T @ x.reshape(-1, d)


def _unit_trace(m: Tensor) -> Tensor:
    """``m / tr(m)``; a zero matrix stays zero."""
    tr = torch.diagonal(m).sum()
    return m / torch.where(tr > 0, tr, torch.ones_like(tr))


def example_sq_norms(ex: Examples) -> Tensor:
    """``||D_i||_F^2 = ||G_i A_i^T||_F^2`` for every example; shape ``(N,)``.

    For ``T = 1`` this is ``||a_i||^2 ||g_i||^2``. Otherwise the cheaper of two exact forms:
    ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` via ``T×T`` Gram matrices (cost ``T²(d_in+d_out)``) or the
    per-example gradients themselves (cost ``T·d_in·d_out``, see
    :meth:`tekfac.capture.Examples.gradients`).
    """
    t, d_out = ex.g.shape[1:]
    d_in = ex.layer.d_in
    if t == 1:
        return ex.input_sq_norms() * torch.linalg.vector_norm(ex.g, dim=(1, 2)).square()
    if t * (d_in + d_out) < d_in * d_out:
        return torch.cat([(a @ a.transpose(1, 2) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))
                          for a, g in ex.pieces()])
    return torch.cat([torch.linalg.vector_norm(d, dim=(1, 2)).square() for d in ex.gradients()])


def per_example_gradients(a: Tensor, g: Tensor) -> Iterator[Tensor]:
    """``D_i = G_i A_i^T`` in chunks over the batch, each of shape ``(n_chunk, d_out, d_in)``,
    at most :data:`CHUNK_ELEMENTS` elements at a time."""
    for part in example_ranges(a.shape[0], a.shape[-1] * g.shape[-1]):
        yield g[part].transpose(1, 2) @ a[part]


def example_ranges(n: int, elements_per_example: int) -> list[slice]:
    """Consecutive ranges of ``n`` examples, each of at most about :data:`CHUNK_ELEMENTS`
    elements (and at least one example)."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_example))
    return [slice(start, start + step) for start in range(0, n, step)]


class FactorKind(NamedTuple):
    """A factor kind: batch-mean statistics of a forward's examples (and whether ``δ`` is
    needed), then a normalisation applied after batches (or ranks) have been averaged."""

    batch: Callable[[Examples, bool], FactorStatistics]
    finalize: Callable[[FactorStatistics], FactorStatistics]


FACTOR_KINDS = {
    "kronecker": FactorKind(kronecker_factors, lambda stats: stats),
    "trace_restricted": FactorKind(trace_restricted_factors, unit_trace_factors),
}
