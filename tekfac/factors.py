"""The two factor kinds that give the Kronecker-factored eigenbasis (docs/design.md §2(a)).

A factor kind turns one forward's examples (:class:`tekfac.records.Examples`: patches ``a``
of shape ``(N, T, d_in)``, only ever unfolded piece by piece or not at all, and per-example
output gradients ``g`` of shape ``(N, T, d_out)``) into batch estimates of an input-side factor
``(d_in, d_in)``, an output-side factor ``(d_out, d_out)`` and a scalar scale ``δ``, such that
its Kronecker approximation is ``F̂ = δ · out ⊗ in``. A diagonal side (see
:mod:`tekfac.layers`) gets the diagonal of that factor, a vector. Every statistic is a mean
over examples, so the estimates of several micro-batches or ranks combine by a weighted
average before :meth:`FactorKind.finalize`. :data:`FACTOR_KINDS` is the registry; a new kind
is one entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from tekfac.chunks import example_ranges

if TYPE_CHECKING:
    from tekfac.records import Examples


class FactorStatistics(NamedTuple):
    """One batch's factors: ``factor_in (d_in, d_in)``, ``factor_out (d_out, d_out)``,
    ``scale`` (0-dim, ``δ``)."""

    factor_in: Tensor
    factor_out: Tensor
    scale: Tensor


class FactorKind:
    """A factor kind: the batch means of a forward's factors, its scale ``δ``, and the
    normalisation applied once batches (or ranks) have been averaged."""

    def factors(self, ex: Examples) -> tuple[Tensor, Tensor]:
        """Batch-mean input-side and output-side factors."""
        raise NotImplementedError

    def scale(self, ex: Examples) -> Tensor:
        """Batch-mean ``δ`` (0-dim); only asked for when the scaling uses it."""
        raise NotImplementedError

    def finalize(self, stats: FactorStatistics) -> FactorStatistics:
        """The factors as the basis and the scaling use them, from averaged statistics."""
        return stats


class KroneckerFactors(FactorKind):
    """KFAC / KFC factors (Martens & Grosse 2015; Grosse & Martens 2016).

    .. math:: A = \\frac{1}{N T} \\sum_i A_i A_i^T, \\quad G = \\frac{1}{N} \\sum_i G_i G_i^T,
              \\quad δ = 1.
    """

    def factors(self, ex: Examples) -> tuple[Tensor, Tensor]:
        n, t = ex.g.shape[:2]
        return ex.input_moment() / (n * t), _gram(ex.g, diagonal=ex.layer.diagonal_out) / n

    def scale(self, ex: Examples) -> Tensor:
        return ex.g.new_ones(())


class TraceRestrictedFactors(FactorKind):
    r"""TKFAC factors (Gao et al. 2020). With ``Λ_i = A_i A_i^T`` and ``Γ_i = G_i G_i^T``:

    .. math:: Φ ∝ E[\operatorname{tr}(Γ_i) Λ_i], \quad Ψ ∝ E[\operatorname{tr}(Λ_i) Γ_i],
              \quad δ = E[\|G_i A_i^T\|_F^2] = \operatorname{tr} F,

    so that, once :meth:`finalize` has normalised ``Φ`` and ``Ψ`` to trace one,
    ``tr(δ Ψ ⊗ Φ) = tr F``. For ``T = 1`` (Linear) ``δ = E[tr Λ_i tr Γ_i]``; for a
    convolution we use the exact trace (docs/design.md §7).
    """

    def factors(self, ex: Examples) -> tuple[Tensor, Tensor]:
        tr_a = ex.input_sq_norms()  # (N,) tr Λ_i
        tr_g = torch.linalg.vector_norm(ex.g, dim=(1, 2)).square()  # (N,) tr Γ_i
        return (ex.input_moment(tr_g) / ex.n,
                _gram(ex.g, tr_a, diagonal=ex.layer.diagonal_out) / ex.n)

    def scale(self, ex: Examples) -> Tensor:
        return example_sq_norms(ex).sum() / ex.n

    def finalize(self, stats: FactorStatistics) -> FactorStatistics:
        """Normalise the factors to trace one (``δ`` unchanged)."""
        return FactorStatistics(_unit_trace(stats.factor_in), _unit_trace(stats.factor_out),
                                stats.scale)


#: Factor kind name → implementation (docs/design.md §2(a)).
FACTOR_KINDS: dict[str, FactorKind] = {
    "kronecker": KroneckerFactors(),
    "trace_restricted": TraceRestrictedFactors(),
}


def _gram(x: Tensor, weights: Tensor | None = None, diagonal: bool = False) -> Tensor:
    """``Σ_i w_i X_i^T X_i`` for ``x`` of shape ``(N, T, d)``; shape ``(d, d)``, or only its
    diagonal ``(d,)`` if ``diagonal``. One product over the ``N·T`` rows; but when ``x`` is the
    transposed view of a contiguous ``(N, d, T)`` (a convolution's output gradients) with
    ``T ≥ d``, one product per example, which copies nothing and whose ``(N, d, d)`` results
    are at most the size of ``x``."""
    t, d = x.shape[1:]
    if diagonal:
        squares = x.square().sum(dim=1)  # (N, d)
        return squares.sum(dim=0) if weights is None else weights @ squares
    if t >= d and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        per_example = torch.bmm(x.transpose(1, 2), x)
        return per_example.sum(dim=0) if weights is None else torch.tensordot(weights,
                                                                               per_example, 1)
    weighted = x if weights is None else x * weights[:, None, None]
    return weighted.reshape(-1, d).T @ x.reshape(-1, d)


def _unit_trace(m: Tensor) -> Tensor:
    """``m / tr(m)`` (a vector: the diagonal of a factor, ``m / Σ m``); zero stays zero."""
    tr = m.sum() if m.dim() == 1 else torch.diagonal(m).sum()
    return m / torch.where(tr > 0, tr, torch.ones_like(tr))


def example_sq_norms(ex: Examples) -> Tensor:
    """``||D_i||_F^2 = ||G_i A_i^T||_F^2`` for every example; shape ``(N,)``.

    For ``T = 1`` this is ``||a_i||^2 ||g_i||^2``. Otherwise the cheaper of two exact forms:
    ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` via ``T×T`` Gram matrices (cost ``T²(d_in+d_out)``) or the
    per-example gradients themselves (cost ``T·d_in·d_out``, see
    :meth:`tekfac.records.Examples.gradients`).
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
    at most :data:`tekfac.chunks.CHUNK_ELEMENTS` elements at a time."""
    for part in example_ranges(a.shape[0], a.shape[-1] * g.shape[-1]):
        yield g[part].transpose(1, 2) @ a[part]
