"""The layers that get a Kronecker-factored block, one class per layer kind (docs/design.md §1).

For a supported layer the parameter matrix is ``M = [W.flatten(1) | b[:, None]]`` of shape
``(d_out, d_in + 1)`` (no bias column without a bias). Per example ``i`` of a batch of ``N``
the layer sees ``A_i`` of shape ``(d_in [+1], T)`` (inputs, or unfolded patches, with a row of
ones for the bias) and ``G_i`` of shape ``(d_out, T)`` (gradients w.r.t. the outputs). Every
layer class gives the same canonical views, batch first: ``a`` of shape ``(N, T, d_in [+1])``
and ``g`` of shape ``(N, T, d_out)``, so that ``D_i = G_i A_i^T = g[i].T @ a[i]``; the maths
(:mod:`tekfac.factors`, :mod:`tekfac.scaling`) only ever sees these views.

:class:`KroneckerLayer` holds what all kinds share (shapes, the gradient matrix, splitting a
direction back into parameters); :class:`LinearLayer` and :class:`ConvLayer` implement the
views. A new layer kind is one subclass and one :data:`LAYER_KINDS` entry (or
:data:`LIBRARY_LAYER_KINDS`, for a module of an optional library such as Hugging Face's
``Conv1D``, :class:`TransposedLinearLayer`).

A side of the block can be *diagonal* (:attr:`KroneckerLayer.diagonal_in`,
:attr:`KroneckerLayer.diagonal_out`): its factor is kept as the vector of its diagonal, whose
eigenbasis is the identity (docs/design.md §2(c)). The input side of an embedding is diagonal
exactly (one-hot inputs); a side wider than ``max_factor_dim`` is restricted to its diagonal.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tekfac import patch_moments
from tekfac.chunks import example_ranges
from tekfac.guards import user_stacklevel
from tekfac.sharding import full, shard_like


class KroneckerLayer:
    """A supported module with the shapes of its Kronecker block.

    Attributes:
        name: qualified module name in the model.
        module: the module.
        unbatched_dims: the dimensions of one unbatched example's input (PyTorch accepts an
            input without the batch dimension: ``(d,)`` for Linear, ``(C, L)`` for Conv1d,
            ``(C, H, W)`` for Conv2d).
        has_bias: whether ``M`` has a bias column.
        d_in: columns of ``M``: ``in_features`` or ``in_channels·prod(kernel_size)``, plus one
            for the bias.
        d_out: rows of ``M``: ``out_features`` or ``out_channels``.
        diagonal_in / diagonal_out: whether that side's factor is kept as its diagonal
            (:meth:`input_moment` and the output-side statistics then return vectors).
        rank: the eigenvectors a dense side keeps at most (``None``: all; see :meth:`kept`).
    """

    unbatched_dims = 1

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.has_bias = getattr(module, "bias", None) is not None
        self.d_out = module.weight.shape[0]
        self.d_in = module.weight[0].numel() + int(self.has_bias)
        self.diagonal_in = self.diagonal_out = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, d_out={self.d_out}, d_in={self.d_in})"

    def kept(self, side: str) -> int:
        """Eigenvectors the basis of ``side`` (``"in"``/``"out"``) keeps: its width, or
        :attr:`rank` if smaller (a diagonal side keeps every coordinate)."""
        d = self.d_in if side == "in" else self.d_out
        diagonal = self.diagonal_in if side == "in" else self.diagonal_out
        return d if diagonal or self.rank is None else min(d, self.rank)

    def restrict_to_diagonal(self, max_factor_dim: int | None) -> list[str]:
        """Make every side wider than ``max_factor_dim`` diagonal; returns the sides changed
        (``"input"``, ``"output"``)."""
        if max_factor_dim is None:
            return []
        changed = []
        if self.d_in > max_factor_dim and not self.diagonal_in:
            self.diagonal_in = True
            changed.append("input")
        if self.d_out > max_factor_dim and not self.diagonal_out:
            self.diagonal_out = True
            changed.append("output")
        return changed

    @property
    def params(self) -> list[nn.Parameter]:
        """The weight, then the bias if any."""
        m = self.module
        return [m.weight] + ([m.bias] if self.has_bias else [])

    @property
    def num_params(self) -> int:
        """``p = d_out · d_in``, the size of the Kronecker block's side."""
        return self.d_out * self.d_in

    def gradient_matrix(self, weight_decay: float | Mapping[Tensor, float] = 0.0
                        ) -> Tensor | None:
        """``[dW.flatten(1) | db]`` of shape ``(d_out, d_in)``, plus ``wd·M`` (one ``wd``, or
        one per parameter: ``[wd_W·W | wd_b·b]``, 0 for a parameter absent), or ``None`` when the
        layer received no gradient. Sharded parameters' pieces are gathered whole
        (:func:`tekfac.sharding.full`, a collective: every rank calls it for every layer)."""
        params = self.params
        if any(p.grad is None for p in params):
            return None
        decay = ([weight_decay.get(p, 0.0) for p in params] if isinstance(weight_decay, Mapping)
                 else [weight_decay] * len(params))
        return self.matrix([full(p.grad + wd * p.detach() if wd else p.grad)
                            for p, wd in zip(params, decay)])

    def placed(self, matrix: Tensor) -> list[Tensor]:
        """A ``(d_out, d_in)`` matrix cut into tensors placed like :attr:`params`: this rank's
        shard of each where the parameter is a ``DTensor`` (:func:`tekfac.sharding.shard_like`),
        else :meth:`split`'s pieces."""
        return [shard_like(piece, p) for piece, p in zip(self.split(matrix), self.params)]

    def parameter_matrix(self) -> Tensor:
        """``[W.flatten(1) | b]`` of shape ``(d_out, d_in)``."""
        return self.matrix([p.detach() for p in self.params])

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        """Tensors shaped like :attr:`params` as one ``(d_out, d_in)`` matrix."""
        return torch.cat([t.reshape(self.d_out, -1) for t in tensors], dim=1)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Cut a ``(d_out, d_in)`` matrix into tensors shaped like the weight and the bias."""
        w = self.module.weight
        pieces = [matrix[:, : w[0].numel()].reshape(w.shape)]
        if self.has_bias:
            pieces.append(matrix[:, -1])
        return pieces

    # ------------------------------------------------------------ the canonical views
    def batched(self, x: Tensor) -> Tensor:
        """The layer's input with a leading batch dimension: one unbatched example becomes a
        batch of one."""
        return x[None] if x.dim() == self.unbatched_dims else x

    def inputs(self, x: Tensor) -> Tensor:
        """Layer input to ``a`` of shape ``(N, T, d_in)`` (patches for conv, ones for bias)."""
        a = self._features(x)
        if self.has_bias:
            a = torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1)
        return a

    def _features(self, x: Tensor) -> Tensor:
        """``a`` without the bias column, ``(N, T, d_in - has_bias)``."""
        raise NotImplementedError

    def output_gradients(self, gy: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output to ``g`` of shape ``(N, T, d_out)``."""
        raise NotImplementedError

    def locations(self, x: Tensor) -> int:
        """``T``, the output locations per example of a batched input ``x``."""
        raise NotImplementedError

    def input_moment(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Σ_i w_i A_i A_i^T`` of shape ``(d_in, d_in)`` for a batched input ``x`` (weights
        ``(N,)``, default 1), unfolding ``a`` in chunks (:mod:`tekfac.chunks`); only its
        diagonal, ``(d_in,)``, if the input side is diagonal."""
        total = None
        for part in example_ranges(len(x), self.inputs(x[:1]).numel()):
            a = self.inputs(x[part])
            if weights is not None:
                a = a * weights[part].sqrt()[:, None, None]
            a = a.reshape(-1, a.shape[-1])
            moment = a.square().sum(dim=0) if self.diagonal_in else a.T @ a
            total = moment if total is None else total + moment
        return total

    def input_moment_flops(self, x: Tensor) -> int:
        """FLOPs of :meth:`input_moment` on the batched input ``x`` (the path it takes)."""
        return 2 * x.shape[0] * self.locations(x) * self.d_in ** 2

    def input_sq_norms(self, x: Tensor) -> Tensor:
        """``tr(A_i A_i^T) = Σ_t ||a_{i,t}||²`` per example of a batched input; shape ``(N,)``."""
        return self.inputs(x).square().sum(dim=(1, 2))

    def example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        """``D_i = G_i A_i^T`` of every example of a batched input ``x`` with output gradients
        ``g (N, T, d_out)``; shape ``(N, d_out, d_in)``."""
        return g.transpose(1, 2) @ self.inputs(x)


class LinearLayer(KroneckerLayer):
    """``nn.Linear`` on batched inputs of any leading dimensions: every position of one
    example is one of its ``T`` locations."""

    def _features(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_gradients(self, gy: Tensor) -> Tensor:
        return gy.reshape(gy.shape[0], -1, gy.shape[-1])

    def locations(self, x: Tensor) -> int:
        return x[0].numel() // x.shape[-1]


class TransposedLinearLayer(LinearLayer):
    """Hugging Face's ``Conv1D`` (the projections of GPT-2 and its kin): ``y = x W + b`` with a
    weight of shape ``(d_in, d_out)``, the transpose of ``nn.Linear``'s, so the parameter
    matrix is ``M = [Wᵀ | b]``; inputs and outputs are those of ``nn.Linear``."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.d_out = module.weight.shape[1]
        self.d_in = module.weight.shape[0] + int(self.has_bias)

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        return torch.cat([tensors[0].T] + [t[:, None] for t in tensors[1:]], dim=1)

    def split(self, matrix: Tensor) -> list[Tensor]:
        pieces = [matrix[:, : self.module.weight.shape[0]].T]
        if self.has_bias:
            pieces.append(matrix[:, -1])
        return pieces


class ConvLayer(KroneckerLayer):
    """``nn.Conv1d`` / ``nn.Conv2d`` with any stride, padding (numbers, ``'same'``,
    ``'valid'``, every ``padding_mode``) and dilation; ``T`` is the number of output
    locations. Grouped convolutions have no single Kronecker block and are refused."""

    def __init__(self, name: str, module: nn.Module):
        if module.groups != 1:
            raise ValueError(
                f"Layer {name!r} is a grouped convolution (groups={module.groups}), which has no "
                "single Kronecker block; pass exclude=[model.<that layer>] (or its name) to give "
                "it the first-order step instead")
        super().__init__(name, module)
        self.unbatched_dims = 2 if isinstance(module, nn.Conv1d) else 3

    def _features(self, x: Tensor) -> Tensor:
        """Unfolded input patches ``(N, T, C_in·prod(kernel))``, columns in the order of
        ``weight.flatten(1)``."""
        padded, geo = self.padded(x)
        cols = F.unfold(padded, geo.kernel, dilation=geo.dilation, stride=geo.stride)
        return cols.transpose(1, 2)

    def output_gradients(self, gy: Tensor) -> Tensor:
        return gy.flatten(2).transpose(1, 2)

    def locations(self, x: Tensor) -> int:
        h_out, w_out = self.padded(x[:1])[1].out
        return h_out * w_out

    def input_moment(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """As :meth:`KroneckerLayer.input_moment`, or by the spatial correlation of
        :mod:`tekfac.patch_moments` where that needs fewer FLOPs; both are exact."""
        if not self.diagonal_in and patch_moments.correlation_is_cheaper(
                x.shape[1], self.padded(x[:1])[1]):
            return patch_moments.second_moment(*self.padded(x), weights, self.has_bias)
        return super().input_moment(x, weights)

    def input_moment_flops(self, x: Tensor) -> int:
        return x.shape[0] * min(patch_moments.moment_flops(x.shape[1], self.padded(x[:1])[1]))

    def input_sq_norms(self, x: Tensor) -> Tensor:
        padded, geo = self.padded(x)
        norms = patch_moments.patch_sq_norms(padded, geo)
        return norms + self.has_bias * (geo.out[0] * geo.out[1])

    def example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        """The weight gradient of one grouped convolution with a group per example (and
        ``Σ_t g_t`` for the bias), so the patches are never unfolded."""
        padded, geo = self.padded(x)
        n, c = padded.shape[:2]
        weights = torch.nn.grad.conv2d_weight(
            padded.reshape(1, n * c, *padded.shape[2:]), (n * self.d_out, c, *geo.kernel),
            g.transpose(1, 2).reshape(1, n * self.d_out, *geo.out), stride=geo.stride,
            dilation=geo.dilation, groups=n).view(n, self.d_out, -1)
        if not self.has_bias:
            return weights
        return torch.cat([weights, g.sum(dim=1)[:, :, None]], dim=2)

    def padded(self, x: Tensor) -> tuple[Tensor, patch_moments.Geometry]:
        """The input with its padding applied explicitly, as ``(N, C, H, W)`` (a Conv1d input
        gets a height of 1), and the geometry of the 'valid' convolution that the layer
        computes on it, so that the patches are exactly what the convolution multiplied."""
        conv = self.module
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


class EmbeddingLayer(KroneckerLayer):
    """``nn.Embedding``: the weight is ``(V, d)``, so the parameter matrix is its transpose,
    ``M = W^T`` of shape ``(d_out, d_in) = (d, V)``, and ``A_i`` holds the one-hot columns of the
    example's ``T`` tokens. The input-side factor is diagonal exactly (token frequencies, zero
    for tokens never seen, where only the damping acts), so the input side is always diagonal.
    An input ``(N, ...)`` of indices is ``N`` examples of ``T = prod(...)`` tokens each (a 0-dim
    index is one example); tokens equal to ``padding_idx`` receive no gradient, so they count
    as no input. ``sparse``, ``max_norm`` and ``scale_grad_by_freq`` change the gradient the
    block would precondition, so such embeddings are refused (see :func:`plan_layers`).
    """

    unbatched_dims = 0

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.d_in, self.d_out = module.weight.shape
        self.diagonal_in = True

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        return tensors[0].T

    def split(self, matrix: Tensor) -> list[Tensor]:
        return [matrix.T]

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x`` as ``(N, T)`` indices, and the mask of tokens that are not ``padding_idx``
        (``None`` without one)."""
        tokens = x.reshape(x.shape[0], -1)
        pad = self.module.padding_idx
        return tokens, None if pad is None else tokens != pad

    def _features(self, x: Tensor) -> Tensor:
        tokens, mask = self._tokens(x)
        dtype = self.module.weight.dtype
        a = F.one_hot(tokens, self.d_in).to(dtype)
        return a if mask is None else a * mask[..., None]

    def output_gradients(self, gy: Tensor) -> Tensor:
        return gy.reshape(gy.shape[0], -1, gy.shape[-1])

    def locations(self, x: Tensor) -> int:
        return x[0].numel()

    def input_moment(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Σ_i w_i A_i A_i^T`` is diagonal: the (weighted) count of every token."""
        tokens, mask = self._tokens(x)
        dtype = weights.dtype if weights is not None else self.module.weight.dtype
        counts = tokens.new_ones(tokens.shape, dtype=dtype)
        if weights is not None:
            counts = counts * weights[:, None]
        if mask is not None:
            counts = counts * mask
        return counts.new_zeros(self.d_in).index_add_(0, tokens.flatten(), counts.flatten())

    def input_moment_flops(self, x: Tensor) -> int:
        return x.numel()

    def input_sq_norms(self, x: Tensor) -> Tensor:
        tokens, mask = self._tokens(x)
        dtype = self.module.weight.dtype
        if mask is None:
            return tokens.new_full((len(tokens),), tokens.shape[1], dtype=dtype)
        return mask.sum(dim=1).to(dtype)

    def example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        """``D_i = G_i A_i^T``: every token's output gradient added into its column."""
        tokens, mask = self._tokens(x)
        if mask is not None:
            g = g * mask[..., None]
        n, t, d = g.shape
        d_i = g.new_zeros(n, self.d_in, d).scatter_add_(1, tokens[..., None].expand(n, t, d), g)
        return d_i.transpose(1, 2)


def _pair(value: int | tuple[int, ...], one_d: bool, fill: int = 1) -> tuple[int, int]:
    """A conv hyper-parameter as a ``(height, width)`` pair; a Conv1d gets height ``fill``."""
    if isinstance(value, int):
        return (fill, value) if one_d else (value, value)
    return (fill, value[0]) if one_d else (value[0], value[1])


#: Module type → the layer class that gives it a Kronecker block.
LAYER_KINDS: dict[type[nn.Module], type[KroneckerLayer]] = {
    nn.Linear: LinearLayer, nn.Conv1d: ConvLayer, nn.Conv2d: ConvLayer,
    nn.Embedding: EmbeddingLayer}

#: Layer kinds of optional libraries: (module, class name) → layer class, claimed once that
#: module is imported (a model holding such a layer has imported it), so that tekfac needs
#: none of them.
LIBRARY_LAYER_KINDS: dict[tuple[str, str], type[KroneckerLayer]] = {
    ("transformers.pytorch_utils", "Conv1D"): TransposedLinearLayer}


def layer_kinds() -> dict[type[nn.Module], type[KroneckerLayer]]:
    """:data:`LAYER_KINDS` and the :data:`LIBRARY_LAYER_KINDS` whose library is imported."""
    kinds = dict(LAYER_KINDS)
    for (module, name), kind in LIBRARY_LAYER_KINDS.items():
        library_type = getattr(sys.modules.get(module), name, None)
        if isinstance(library_type, type):
            kinds[library_type] = kind
    return kinds


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile``'s
    ``OptimizedModule`` (in any nesting), else ``model``: the names users write (``exclude``
    patterns, ``describe()``) are the bare model's."""
    # torch.compile's wrapper class, if torch.compile was ever imported (else none can exist)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif compiled and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


class Untracked(NamedTuple):
    """A module with parameters of its own that gets no Kronecker block, why, and whether the
    user said so (``exclude``)."""

    name: str
    module: nn.Module
    reason: str
    excluded: bool = False


def plan_layers(model: nn.Module, exclude: Iterable[nn.Module | nn.Parameter | str] = (),
                max_factor_dim: int | None = None
                ) -> tuple[list[KroneckerLayer], list[Untracked]]:
    """The supported, trainable, not excluded layers of ``model`` in module order, and every
    other module with parameters of its own, with the reason it is left to the first-order
    step.

    ``exclude`` holds modules, parameters (their layer is excluded: a block covers the weight
    and the bias together), or ``fnmatch`` patterns matched against qualified module names
    (``"classifier.*"``); excluding a module excludes its sub-modules. An entry that matches
    nothing in the model is an error (a typo would otherwise pass unnoticed), and so are the
    layers whose gradient no block fits, unless excluded — grouped convolutions and embeddings
    with ``sparse``, ``max_norm`` or ``scale_grad_by_freq``: all of them are named in one
    message. An embedding tied to another tracked layer (a language model's output layer) is
    left to that layer's block. A side of a block wider than ``max_factor_dim`` is kept as its
    diagonal, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    excluded = _excluded_modules(model, named, list(exclude))
    inside_attention = {id(m) for a in named.values() if isinstance(a, nn.MultiheadAttention)
                        for m in a.modules() if m is not a}
    layers, untracked, refused = [], [], []
    for name, module in named.items():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        reason = excluded.get(id(module))
        if reason is None and id(module) in inside_attention:
            reason = ("inside nn.MultiheadAttention, which calls F.linear with its weight, so "
                      "no statistics would reach it")
        if reason is None and not is_supported(module):
            reason = f"{type(module).__name__} has no Kronecker block"
        if reason is None and not all(p.requires_grad for p in own):
            reason = "frozen (requires_grad=False)"
        if reason is None and (why := _unfit(module)):
            refused.append(f"{name!r} ({why})")
        elif reason is None:
            layers.append(make_layer(name, module))
        else:
            untracked.append(Untracked(name, module, reason, id(module) in excluded))
    if refused:
        raise ValueError(
            f"Layers {', '.join(refused)} have gradients that no single Kronecker block fits "
            "(grouped convolutions; embeddings with sparse, max_norm or scale_grad_by_freq); "
            "pass exclude=[...] with these layers (or their names) to give them the "
            "first-order step instead")
    layers, tied = _resolve_shared(layers)
    for layer in layers:
        for side in layer.restrict_to_diagonal(max_factor_dim):
            width = layer.d_in if side == "input" else layer.d_out
            warnings.warn(
                f"Layer {layer.name!r}: its {side}-side factor would be {width} × {width}, "
                f"over max_factor_dim={max_factor_dim}; keeping only its diagonal. Raise "
                "max_factor_dim to keep the full factor, or exclude the layer",
                stacklevel=user_stacklevel())
    _warn_unclaimed(model, untracked)
    order = {name: i for i, name in enumerate(named)}
    untracked = sorted(untracked + tied, key=lambda u: order[u.name])
    return layers, untracked


def _warn_unclaimed(model: nn.Module, untracked: list[Untracked]) -> None:
    """Warn about the modules left to the first-order step that hold a trainable parameter of
    two or more dimensions although nobody excluded them: most likely a layer kind tekfac does
    not know (a library's own projection, ``nn.MultiheadAttention``'s ``in_proj_weight``) or a
    layer whose bias is frozen, which a user would otherwise believe preconditioned."""
    unclaimed = [u for u in untracked if not u.excluded
                 and any(p.dim() >= 2 and p.requires_grad
                         for p in u.module.parameters(recurse=False))]
    if not unclaimed:
        return
    trainable = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    left = {id(p) for u in unclaimed for p in u.module.parameters(recurse=False)
            if id(p) in trainable}
    share = sum(trainable[i] for i in left) / max(sum(trainable.values()), 1)
    names = ", ".join(f"{repr(u.name) if u.name else '(model)'} ({type(u.module).__name__})"
                      for u in unclaimed[:5])
    more = f" and {len(unclaimed) - 5} more" if len(unclaimed) > 5 else ""
    warnings.warn(
        f"Modules {names}{more} hold weights of two or more dimensions that get no Kronecker "
        "block; they take the "
        f"first-order step, {share:.1%} of the trainable parameters (describe() lists every "
        "module and why). Pass exclude=[...] with them (modules, name patterns, or for the "
        "model's own parameters the parameters) to silence this warning",
        stacklevel=user_stacklevel())


def _unfit(module: nn.Module) -> str | None:
    """Why no block fits a supported module's gradient, or ``None``."""
    if getattr(module, "groups", 1) != 1:
        return f"groups={module.groups}"
    if isinstance(module, nn.Embedding):
        options = [f"{k}={getattr(module, k)}" for k in ("sparse", "scale_grad_by_freq")
                   if getattr(module, k)]
        options += [f"max_norm={module.max_norm}"] if module.max_norm is not None else []
        if options:
            return ", ".join(options)
    return None


def describe_layers(model: nn.Module, layers: list[KroneckerLayer], untracked: list[Untracked],
                    method: str) -> str:
    """The table of :meth:`tekfac.Preconditioner.describe`: one row per module with
    parameters of its own, in module order: its type, parameter count, and the ``method``
    block it gets (with the modules it shares parameters with) or the reason it takes the
    first-order step."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            users.setdefault(id(param), []).append(name)

    def shared(layer: KroneckerLayer) -> str:
        others = [n for p in layer.params for n in users[id(p)] if n != layer.name]
        return (f"; shares parameters with {', '.join(map(repr, others))}, whose use adds "
                "no curvature to this block") if others else ""

    rows = [(la.name, la.module, f"{method} block ({la.d_out} × {la.d_in}){shared(la)}")
            for la in layers]
    rows += [(u.name, u.module, f"first-order: {u.reason}") for u in untracked]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda row: order[row[0]])
    table = [("module", "type", "parameters", "preconditioning")]
    table += [(name or "(model)", type(m).__name__,
               str(sum(p.numel() for p in m.parameters(recurse=False))), what)
              for name, m, what in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[3]]).rstrip()
                     for row in table)


def _resolve_shared(layers: list[KroneckerLayer]
                    ) -> tuple[list[KroneckerLayer], list[Untracked]]:
    """The layers that keep their blocks, and the embeddings left untracked, for parameters
    held by several layers (docs/design.md §7). An embedding whose weight another layer also
    holds (weight tying) is left to that layer's block: the two uses play transposed roles,
    so no single Kronecker block covers both. Any other parameter held by two tracked layers
    is refused: each would precondition the shared gradient with its own block, and only one
    direction can be applied. (A parameter shared with an untracked module is preconditioned
    by the tracked layer's block alone.)"""
    holders: dict[int, list[KroneckerLayer]] = {}
    for layer in layers:
        for param in layer.params:
            holders.setdefault(id(param), []).append(layer)
    tied = {la: next(o for o in holders[id(la.module.weight)] if o is not la)
            for la in layers
            if isinstance(la, EmbeddingLayer) and len(holders[id(la.module.weight)]) > 1}
    kept = [la for la in layers if la not in tied]
    for layer in kept:
        for param in layer.params:
            first = next(o for o in holders[id(param)] if o not in tied)
            if first is not layer:
                raise ValueError(
                    f"Layers {first.name!r} and {layer.name!r} share a parameter of shape "
                    f"{tuple(param.shape)}; a Kronecker block belongs to one layer: pass "
                    f"exclude=[{layer.name!r}] (or both names) to leave the shared parameter "
                    "to one block (or to the first-order step)")
    return kept, [Untracked(la.name, la.module, (
        f"its weight is tied to {other.name!r}, whose block preconditions it (built from "
        "that layer's use alone)")) for la, other in tied.items()]


def _excluded_modules(model: nn.Module, named: dict[str, nn.Module],
                      exclude: list[nn.Module | nn.Parameter | str]) -> dict[int, str]:
    """``id(module)`` → why it is excluded, for every module the ``exclude`` entries name."""
    owners = {id(p): m for m in named.values() for p in m.parameters(recurse=False)}
    modules = {id(m) for m in named.values()}
    found: dict[int, str] = {}
    for item in exclude:
        if isinstance(item, nn.Parameter):
            if id(item) not in owners:
                raise ValueError(f"Invalid exclude entry: a parameter of shape "
                                 f"{tuple(item.shape)} that is not one of the model's")
            found[id(owners[id(item)])] = "excluded (one of its parameters)"
        elif isinstance(item, nn.Module):
            if id(item) not in modules:
                raise ValueError(f"Invalid exclude entry: the {type(item).__name__} "
                                 f"{item!r} is not a module of the model")
            found.update({id(m): "excluded" for m in item.modules()})
        elif isinstance(item, str):
            hits = [m for n, m in named.items()
                    if fnmatch.fnmatchcase(n, item) or fnmatch.fnmatchcase(n, item + ".*")]
            if not hits:
                close = difflib.get_close_matches(item, [n for n in named if n], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                if any(fnmatch.fnmatchcase(n, item) for n, _ in model.named_parameters()):
                    hint = (f"; it names parameters, and patterns match module names: use "
                            f"{item.rsplit('.', 1)[0]!r}, or pass the parameter itself")
                raise ValueError(f"Invalid exclude entry {item!r}: it matches no module "
                                 f"name{hint}")
            found.update({id(m): f"excluded by {item!r}" for m in hits})
        else:
            raise TypeError(f"Invalid exclude entry {item!r}: expected a module, a parameter or "
                            "a name pattern")
    return found


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` is of a kind in :func:`layer_kinds`."""
    return isinstance(module, tuple(layer_kinds()))


def make_layer(name: str, module: nn.Module) -> KroneckerLayer:
    """The :class:`KroneckerLayer` of a supported ``module`` (its exact type's class, else
    that of its nearest supported base class)."""
    kinds = layer_kinds()
    for kind in type(module).__mro__:
        if kind in kinds:
            return kinds[kind](name, module)
    raise TypeError(f"Layer {name!r} ({type(module).__name__}) has no Kronecker block; "
                    f"supported: {', '.join(k.__name__ for k in kinds)}")
