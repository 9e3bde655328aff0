"""Statistics of a convolution's unfolded patches computed without unfolding them.

A convolution with kernel ``k``, stride ``s`` and dilation ``r`` (per spatial axis) applied to
an explicitly padded input ``x̃`` of shape ``(N, C, H, W)`` multiplies, at output location
``p = (p₁, p₂)``, the patch ``a_{n,p}[c, u] = x̃[n, c, s₁p₁ + r₁u₁, s₂p₂ + r₂u₂]`` (``u`` the
kernel offset; the column order of ``weight.flatten(1)``). The input factor needs the patch
second moment ``Ω = Σ_n w_n Σ_p a_{n,p} a_{n,p}^T``. With ``Y_{u₁}[n, p₁, c, q] =
x̃[n, c, s₁p₁ + r₁u₁, q]`` (the input rows that kernel row ``u₁`` reads), a block of it is

.. math:: Ω_{(c,u₁,u₂),(c',u₁',u₂+Δ)} = \\sum_{p₂} M[c, c', s₂p₂ + r₂u₂],
          \\quad M[c, c', q] = \\sum_{n,p₁} w_n Y_{u₁}[n,p₁,c,q] Y_{u₁'}[n,p₁,c',q + r₂Δ].

Unfolding costs ``2·N·T·(C·k₁k₂)²`` FLOPs (``T = H_out·W_out``). The right-hand form computes
one ``M`` per pair of kernel rows ``u₁ ≤ u₁'`` (``Ω`` is symmetric) and per column
difference ``Δ``, at every input column it touches, as a batched product with ``N·H_out``
terms, then sums strided windows of it: each product serves every ``u₂`` at once, which makes
a stride-1 5×5 convolution about 4× cheaper. :func:`correlation_is_cheaper` picks the cheaper
form by counting both. All functions take the padded input as 4-d (a Conv1d input gets a
height of 1) and work in its dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Geometry(NamedTuple):
    """``kernel``, ``stride``, ``dilation`` as ``(height, width)`` pairs, and the output size
    ``out`` ``(H_out, W_out)`` of a convolution on an explicitly padded input."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    out: tuple[int, int]


def second_moment(x: Tensor, geo: Geometry, weights: Tensor | None = None) -> Tensor:
    """``Ω = Σ_n w_n Σ_p a_{n,p} a_{n,p}^T`` of shape ``(C·k₁k₂, C·k₁k₂)`` (no bias column) by
    the correlation of the module docstring; ``x`` is the padded input ``(N, C, H, W)``,
    ``weights`` ``(N,)`` non-negative (default 1)."""
    n, c, _, width = x.shape
    (k1, k2), (s1, s2), (r1, r2), (h_out, w_out) = geo
    if weights is not None:
        x = x * weights.sqrt()[:, None, None, None]
    rows = [x[:, :, r1 * u: r1 * u + s1 * (h_out - 1) + 1: s1] for u in range(k1)]
    ys = [y.permute(3, 1, 0, 2).reshape(width, c, n * h_out) for y in rows]  # (W, C, N·H_out)
    omega = x.new_zeros(c, k1, k2, c, k1, k2)
    for u1 in range(k1):
        for v1 in range(u1, k1):
            for d in range(0 if v1 == u1 else -(k2 - 1), k2):  # v1 = u1: the rest by symmetry
                first, count = max(0, -d), k2 - abs(d)  # u₂ with u₂ and u₂ + Δ in the kernel
                cols = _span(first, count, r2, s2, w_out)
                left = ys[u1][cols]
                right = ys[v1][cols.start + r2 * d: cols.stop + r2 * d]
                m = _window_sums(torch.bmm(left, right.transpose(1, 2)), 0,
                                 [r2 * j for j in range(count)], s2, w_out)  # (count, C, C)
                omega[:, u1, :, :, v1].diagonal(d, 1, 3).copy_(m.permute(1, 2, 0))
                if v1 != u1 or d:
                    omega[:, v1, :, :, u1].diagonal(-d, 1, 3).copy_(m.permute(2, 1, 0))
    return omega.reshape(c * k1 * k2, c * k1 * k2)


def patch_sums(x: Tensor, geo: Geometry, weights: Tensor | None = None) -> Tensor:
    """``Σ_n w_n Σ_p a_{n,p}``, shape ``(C·k₁k₂,)``: the bias column of ``Ω``."""
    total = (x if weights is None else x * weights[:, None, None, None]).sum(dim=0)
    return _kernel_windows(total, geo).flatten()


def patch_sq_norms(x: Tensor, geo: Geometry) -> Tensor:
    """``Σ_p ||a_{n,p}||²`` per example, shape ``(N,)`` (no bias column)."""
    return _kernel_windows(x.square().sum(dim=1), geo).flatten(1).sum(dim=1)


def moment_flops(c: int, geo: Geometry) -> tuple[int, int]:
    """FLOPs per example of ``Ω`` for ``C = c`` channels: ``(by unfolding, by correlation)``
    (see the module docstring)."""
    (k1, k2), (_, s2), (_, r2), (h_out, w_out) = geo
    pairs = k1 * (k1 - 1) // 2  # u₁ < u₁': every Δ; u₁ = u₁': Δ ≥ 0
    columns = sum((pairs + k1 * (d >= 0)) * _extent(k2 - abs(d), r2, s2, w_out)
                  for d in range(-(k2 - 1), k2))
    return 2 * h_out * w_out * (c * k1 * k2) ** 2, 2 * h_out * columns * c * c


def correlation_is_cheaper(c: int, geo: Geometry) -> bool:
    """Whether :func:`second_moment` needs fewer FLOPs than unfolding."""
    unfold, correlation = moment_flops(c, geo)
    return correlation < unfold


def _extent(count: int, dilation: int, stride: int, out: int) -> int:
    """Input locations touched by ``count`` kernel offsets: ``r·(count-1) + s·(out-1) + 1``."""
    return dilation * (count - 1) + stride * (out - 1) + 1


def _span(first: int, count: int, dilation: int, stride: int, out: int) -> slice:
    """The input locations read by kernel offsets ``first … first+count-1`` over all outputs."""
    start = dilation * first
    return slice(start, start + _extent(count, dilation, stride, out))


def _window_sums(m: Tensor, dim: int, starts: list[int], stride: int, count: int) -> Tensor:
    """``Σ_{p<count} m[start + stride·p]`` along ``dim`` for every start; ``dim`` becomes the
    starts. Computed from prefix sums of every residue class modulo ``stride``."""
    m = m.movedim(dim, 0)
    length = m.shape[0]
    blocks = -(-length // stride) + 1
    padded = m.new_zeros(blocks * stride, *m.shape[1:])
    padded[stride: stride + length] = m  # one leading zero block: prefix sums start at 0
    prefix = padded.reshape(blocks, stride, *m.shape[1:]).cumsum(dim=0)
    begin = torch.tensor([(s // stride) for s in starts], device=m.device)
    residue = torch.tensor([s % stride for s in starts], device=m.device)
    sums = prefix[begin + count, residue] - prefix[begin, residue]
    return sums.movedim(0, dim)


def _kernel_windows(x: Tensor, geo: Geometry) -> Tensor:
    """``Σ_p x[..., s·p + r·u]`` for every kernel offset ``u``: ``(..., H, W)`` →
    ``(..., k₁, k₂)``."""
    (k1, k2), (s1, s2), (r1, r2), (h_out, w_out) = geo
    x = _window_sums(x, -2, [r1 * u for u in range(k1)], s1, h_out)
    return _window_sums(x, -1, [r2 * u for u in range(k2)], s2, w_out)
