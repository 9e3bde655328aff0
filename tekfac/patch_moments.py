r"""Statistics of a convolution's unfolded patches computed without unfolding them.

A convolution with kernel ``k``, stride ``s`` and dilation ``r`` (per spatial axis) applied to
an explicitly padded input ``x̃`` of shape ``(N, C, H, W)`` multiplies, at output location
``p = (p₁, p₂)``, the patch ``a_{n,p}[c, u] = x̃[n, c, s₁p₁ + r₁u₁, s₂p₂ + r₂u₂]`` (``u`` the
kernel offset; the column order of ``weight.flatten(1)``). The input factor needs the patch
second moment ``Ω = Σ_n w_n Σ_p a_{n,p} a_{n,p}^T``. With ``Y[h, (u₂, c), (n, p₂)] =
√w_n x̃[n, c, h, s₂p₂ + r₂u₂]`` (input row ``h``, as every kernel column reads it), the block
of ``Ω`` between kernel rows ``u₁`` and ``u₁ + Δ`` is

.. math:: Ω_{(c,u₁,u₂),(c',u₁+Δ,u₂')} = \sum_{p₁} M_Δ[s₁p₁ + r₁u₁, (u₂,c), (u₂',c')],
          \quad M_Δ[h] = Y[h]\, Y[h + r₁Δ]^T.

Unfolding costs ``2·N·T·(C·k₁k₂)²`` FLOPs (``T = H_out·W_out``). The right-hand form computes,
per row difference ``Δ ≥ 0`` (``Ω`` is symmetric, so ``Δ < 0`` are transposes), one product
``M_Δ[h]`` with ``N·W_out`` terms for every input row it touches — a batched matrix product
with ``k₂·C`` rows and columns — then sums strided windows of it: each product serves every
kernel row ``u₁`` at once, which makes a stride-1 5×5 convolution about 4× cheaper.
:func:`correlation_is_cheaper` picks the cheaper form by counting both. All functions take the
padded input as 4-d (a Conv1d input gets a height of 1) and work in its dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tekfac.chunks import example_ranges


class Geometry(NamedTuple):
    """``kernel``, ``stride``, ``dilation`` as ``(height, width)`` pairs, and the output size
    ``out`` ``(H_out, W_out)`` of a convolution on an explicitly padded input."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    out: tuple[int, int]


def second_moment(x: Tensor, geo: Geometry, weights: Tensor | None = None,
                  bias: bool = False) -> Tensor:
    """``Ω = Σ_n w_n Σ_p a_{n,p} a_{n,p}^T`` of shape ``(D, D)``, ``D = C·k₁k₂ + bias``, by the
    correlation of the module docstring along the longer kernel axis (the image is transposed
    when the kernel is wider than tall, e.g. for every Conv1d); ``x`` is the padded input
    ``(N, C, H, W)``, ``weights`` ``(N,)`` non-negative (default 1). With ``bias`` every patch
    is extended by a constant 1, which appends the row and column ``[Σ_n w_n Σ_p a_{n,p},
    T·Σ_n w_n]``."""
    n, c = x.shape[:2]
    (k1, k2), _, _, (h_out, w_out) = geo
    d = c * k1 * k2
    out = x.new_zeros(d + bias, d + bias)
    omega = out[:d, :d].view(c, k1, k2, c, k1, k2)
    if k2 > k1:
        _add_correlation(omega.permute(0, 2, 1, 3, 5, 4), x.transpose(2, 3), _transposed(geo),
                         weights)
    else:
        _add_correlation(omega, x, geo, weights)
    if bias:
        total = x.sum(dim=0) if weights is None else torch.einsum("n,nchw->chw", weights, x)
        out[:d, d] = out[d, :d] = _kernel_windows(total, geo).flatten()
        out[d, d] = h_out * w_out * (n if weights is None else weights.sum())
    return out


def _add_correlation(omega: Tensor, x: Tensor, geo: Geometry, weights: Tensor | None) -> None:
    """Add ``Ω`` to ``omega``, a view ``[c, u₁, u₂, c', u₁', u₂']``, by the products ``M_Δ`` of
    the module docstring, building ``Y`` for consecutive ranges of examples of at most about
    ``CHUNK_ELEMENTS`` elements."""
    n, c, height, _ = x.shape
    (k1, k2), (s1, s2), (r1, r2), (h_out, w_out) = geo
    blocks = omega.permute(1, 4, 2, 0, 5, 3)  # [u₁, u₁', u₂, c, u₂', c']
    for part in example_ranges(n, height * k2 * c * w_out):
        chunk = x[part] if weights is None else x[part] * weights[part].sqrt()[:, None, None, None]
        chunk = chunk.contiguous()
        columns = chunk.as_strided(  # x̃[n, c, h, s₂p₂ + r₂u₂]
            (len(chunk), c, height, k2, w_out), (*chunk.stride()[:3], r2, s2))
        y = columns.permute(2, 3, 1, 0, 4).contiguous().view(height, k2 * c, -1)
        for shift in range(k1):  # Δ
            offsets = k1 - shift  # the u₁ with u₁ + Δ in the kernel
            rows = _extent(offsets, r1, s1, h_out)
            product = torch.bmm(y[:rows], y[r1 * shift: r1 * shift + rows].transpose(1, 2))
            sums = _window_sums(product, 0, offsets, r1, s1, h_out)
            sums = sums.reshape(offsets, k2, c, k2, c)
            blocks.diagonal(shift, 0, 1).add_(sums.permute(1, 2, 3, 4, 0))
            if shift:
                blocks.diagonal(-shift, 0, 1).add_(sums.permute(3, 4, 1, 2, 0))


def patch_sq_norms(x: Tensor, geo: Geometry) -> Tensor:
    """``Σ_p ||a_{n,p}||²`` per example, shape ``(N,)`` (no bias column)."""
    return _kernel_windows(x.square().sum(dim=1), geo).flatten(1).sum(dim=1)


def moment_flops(c: int, geo: Geometry) -> tuple[int, int]:
    """FLOPs per example of ``Ω`` for ``C = c`` channels: ``(by unfolding, by correlation)``
    (see the module docstring; the correlation runs along the longer kernel axis)."""
    (k1, k2), _, _, (h_out, w_out) = geo
    unfold = 2 * h_out * w_out * (c * k1 * k2) ** 2
    (a1, a2), (s1, _), (r1, _), (rows_out, cols_out) = _transposed(geo) if k2 > k1 else geo
    rows = sum(_extent(a1 - shift, r1, s1, rows_out) for shift in range(a1))
    return unfold, 2 * cols_out * rows * (a2 * c) ** 2


def correlation_is_cheaper(c: int, geo: Geometry) -> bool:
    """Whether :func:`second_moment` needs fewer FLOPs than unfolding."""
    unfold, correlation = moment_flops(c, geo)
    return correlation < unfold


def _transposed(geo: Geometry) -> Geometry:
    """The geometry of the same convolution on the transposed image (height and width swapped)."""
    return Geometry(*(pair[::-1] for pair in geo))


def _extent(count: int, dilation: int, stride: int, out: int) -> int:
    """Input locations touched by ``count`` kernel offsets: ``r·(count-1) + s·(out-1) + 1``."""
    return dilation * (count - 1) + stride * (out - 1) + 1


def _window_sums(m: Tensor, dim: int, windows: int, spacing: int, stride: int,
                 count: int) -> Tensor:
    """``Σ_{p<count} m[spacing·j + stride·p]`` along ``dim`` for ``j < windows``; ``dim``
    becomes ``j``. One product with the 0/1 matrix that selects each window."""
    offsets = (torch.arange(m.shape[dim], device=m.device)
               - spacing * torch.arange(windows, device=m.device)[:, None])
    select = (offsets >= 0) & (offsets < stride * count) & (offsets % stride == 0)
    return torch.tensordot(select.to(m.dtype), m.movedim(dim, 0), dims=1).movedim(0, dim)


def _kernel_windows(x: Tensor, geo: Geometry) -> Tensor:
    """``Σ_p x[..., s·p + r·u]`` for every kernel offset ``u``: ``(..., H, W)`` →
    ``(..., k₁, k₂)``."""
    (k1, k2), (s1, s2), (r1, r2), (h_out, w_out) = geo
    x = _window_sums(x, -2, k1, r1, s1, h_out)
    return _window_sums(x, -1, k2, r2, s2, w_out)
