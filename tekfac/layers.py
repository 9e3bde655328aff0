"""The layers that get a Kronecker-factored block, and their matrix views (DESIGN.md §1).

For a supported layer the parameter matrix is ``M = [W.flatten(1) | b[:, None]]`` of shape
``(d_out, d_in + 1)`` (no bias column without a bias). Per example ``i`` of a batch of ``N``
the layer sees ``A_i`` of shape ``(d_in [+1], T)`` (inputs, or unfolded patches, with a row of
ones for the bias) and ``G_i`` of shape ``(d_out, T)`` (gradients w.r.t. the outputs). This
module stores them transposed, batch first: ``a`` of shape ``(N, T, d_in [+1])`` and ``g`` of
shape ``(N, T, d_out)``, so that ``D_i = G_i A_i^T = g[i].T @ a[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tekfac import factors, patch_moments

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` gets a Kronecker block (Linear, Conv1d, Conv2d)."""
    return isinstance(module, SUPPORTED)


@dataclass(eq=False)
class KroneckerLayer:
    """A supported module with the shapes of its Kronecker block.

    Attributes:
        name: qualified module name in the model.
        module: the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``.
        d_in: columns of ``M``: ``in_features`` or ``in_channels·prod(kernel_size)``, plus one
            for the bias.
        d_out: rows of ``M``: ``out_features`` or ``out_channels``.
    """

    name: str
    module: nn.Module

    def __post_init__(self) -> None:
        m = self.module
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
            raise ValueError(
                f"Layer {self.name!r} is a grouped convolution (groups={m.groups}), which has no "
                "single Kronecker block; pass exclude=[model.<that layer>] (or its name) to give "
                "it the first-order step instead")
        self.has_bias = m.bias is not None
        self.d_out = m.weight.shape[0]
        self.d_in = m.weight[0].numel() + int(self.has_bias)

    @property
    def params(self) -> list[nn.Parameter]:
        """The weight, then the bias if any."""
        m = self.module
        return [m.weight] + ([m.bias] if self.has_bias else [])

    @property
    def num_params(self) -> int:
        """``p = d_out · d_in``, the size of the Kronecker block's side."""
        return self.d_out * self.d_in

    def gradient_matrix(self, weight_decay: float = 0.0) -> Tensor | None:
        """``[dW.flatten(1) | db]`` of shape ``(d_out, d_in)`` (plus ``weight_decay·M``), or
        ``None`` when the layer received no gradient."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return None
        m = torch.cat([g.reshape(self.d_out, -1) for g in grads], dim=1)
        if weight_decay:
            m = m + weight_decay * self.parameter_matrix()
        return m

    def parameter_matrix(self) -> Tensor:
        """``[W.flatten(1) | b]`` of shape ``(d_out, d_in)``."""
        return torch.cat([p.detach().reshape(self.d_out, -1) for p in self.params], dim=1)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Cut a ``(d_out, d_in)`` matrix into tensors shaped like the weight and the bias."""
        w = self.module.weight
        pieces = [matrix[:, : w[0].numel()].reshape(w.shape)]
        if self.has_bias:
            pieces.append(matrix[:, -1])
        return pieces

    def inputs(self, x: Tensor) -> Tensor:
        """Layer input to ``a`` of shape ``(N, T, d_in)`` (patches for conv, ones for bias)."""
        m = self.module
        if isinstance(m, nn.Linear):
            a = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
        else:
            a = _patches(m, x)
        if self.has_bias:
            a = torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1)
        return a

    def input_moment(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Σ_i w_i A_i A_i^T`` of shape ``(d_in, d_in)`` for a batched input ``x`` (weights
        ``(N,)``, default 1). A convolution takes the cheaper of unfolding its patches (in
        chunks of at most :data:`tekfac.factors.CHUNK_ELEMENTS`) and the spatial correlation
        of :mod:`tekfac.patch_moments`; both are exact."""
        if not isinstance(self.module, nn.Linear) and patch_moments.correlation_is_cheaper(
                x.shape[1], _padded(self.module, x[:1])[1]):
            return patch_moments.second_moment(*_padded(self.module, x), weights, self.has_bias)
        total = None
        for part in factors.example_ranges(len(x), self.inputs(x[:1]).numel()):
            a = self.inputs(x[part])
            if weights is not None:
                a = a * weights[part].sqrt()[:, None, None]
            a = a.reshape(-1, a.shape[-1])
            total = a.T @ a if total is None else total + a.T @ a
        return total

    def input_moment_flops(self, x: Tensor) -> int:
        """FLOPs of :meth:`input_moment` on the batched input ``x`` (the path it takes)."""
        if isinstance(self.module, nn.Linear):
            a = self.inputs(x[:1])
            return 2 * x.shape[0] * a.shape[1] * self.d_in ** 2
        return x.shape[0] * min(patch_moments.moment_flops(x.shape[1],
                                                           _padded(self.module, x[:1])[1]))

    def input_sq_norms(self, x: Tensor) -> Tensor:
        """``tr(A_i A_i^T) = Σ_t ||a_{i,t}||²`` per example of a batched input; shape ``(N,)``."""
        m = self.module
        if isinstance(m, nn.Linear):
            return self.inputs(x).square().sum(dim=(1, 2))
        padded, geo = _padded(m, x)
        norms = patch_moments.patch_sq_norms(padded, geo)
        return norms + self.has_bias * (geo.out[0] * geo.out[1])

    def locations(self, x: Tensor) -> int:
        """``T``, the output locations per example of a batched input ``x``."""
        if isinstance(self.module, nn.Linear):
            return x[0].numel() // x.shape[-1]
        h_out, w_out = _padded(self.module, x[:1])[1].out
        return h_out * w_out

    def example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        """``D_i = G_i A_i^T`` of every example of a batched input ``x`` with output gradients
        ``g (N, T, d_out)``; shape ``(N, d_out, d_in)``. A convolution takes them as the weight
        gradient of one grouped convolution with a group per example (and ``Σ_t g_t`` for the
        bias), so its patches are never unfolded."""
        if isinstance(self.module, nn.Linear):
            return g.transpose(1, 2) @ self.inputs(x)
        padded, geo = _padded(self.module, x)
        n, c = padded.shape[:2]
        weights = torch.nn.grad.conv2d_weight(
            padded.reshape(1, n * c, *padded.shape[2:]), (n * self.d_out, c, *geo.kernel),
            g.transpose(1, 2).reshape(1, n * self.d_out, *geo.out), stride=geo.stride,
            dilation=geo.dilation, groups=n).view(n, self.d_out, -1)
        if not self.has_bias:
            return weights
        return torch.cat([weights, g.sum(dim=1)[:, :, None]], dim=2)

    def output_gradients(self, gy: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output to ``g`` of shape ``(N, T, d_out)``."""
        if isinstance(self.module, nn.Linear):
            if gy.dim() == 1:
                return gy.reshape(1, 1, -1)
            return gy.reshape(gy.shape[0], -1, gy.shape[-1])
        return gy.flatten(2).transpose(1, 2)


def _patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches of a convolution, ``(N, T, C_in·prod(kernel))``.

    The column order matches ``weight.flatten(1)``; ``T`` is the number of output locations.
    """
    padded, geo = _padded(conv, x)
    cols = F.unfold(padded, geo.kernel, dilation=geo.dilation, stride=geo.stride)
    return cols.transpose(1, 2)


def _padded(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, patch_moments.Geometry]:
    """The input of a convolution with its padding applied explicitly, as ``(N, C, H, W)``
    (a Conv1d input gets a height of 1), and the geometry of the 'valid' convolution that
    the layer computes on it.

    Padding (numbers, ``'same'``, ``'valid'``, any ``padding_mode``) is applied explicitly so
    that the patches are exactly what the convolution multiplied.
    """
    one_d = isinstance(conv, nn.Conv1d)
    if one_d:
        x = x.unsqueeze(-2)
    kernel, stride, dilation = (_pair(v, one_d) for v in (conv.kernel_size, conv.stride,
                                                          conv.dilation))
    pads: list[int] = []  # F.pad order: last dim first, (left, right) each
    for dim in (1, 0):
        if conv.padding == "valid":
            lo = hi = 0
        elif conv.padding == "same":
            total = dilation[dim] * (kernel[dim] - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = _pair(conv.padding, one_d, fill=0)[dim]
        pads += [lo, hi]
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    out = tuple((size - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
                for d, size in enumerate(x.shape[-2:]))
    return x, patch_moments.Geometry(kernel, stride, dilation, out)


def _pair(value: int | tuple[int, ...], one_d: bool, fill: int = 1) -> tuple[int, int]:
    """A conv hyper-parameter as a ``(height, width)`` pair; a Conv1d gets height ``fill``."""
    if isinstance(value, int):
        return (fill, value) if one_d else (value, value)
    return (fill, value[0]) if one_d else (value[0], value[1])
