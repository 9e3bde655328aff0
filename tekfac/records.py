"""What is recorded of a tracked layer in one step, and its examples as the maths needs them.

A :class:`Call` is one recorded call of a layer (its input and its output gradient); a
:class:`LayerBatch` groups one step's calls of a layer by model forward; :class:`Examples` are
one forward's examples in the canonical views of :mod:`tekfac.layers` (``g (N, T, d_out)``, the
inputs unfolded only piece by piece), which :mod:`tekfac.factors` and :mod:`tekfac.scaling` read.
Calls of one forward are the same examples seen several times (weight sharing, recurrence),
so they are concatenated along the locations ``T`` (KFAC-expand); different forwards are
different examples (gradient accumulation over micro-batches), concatenated along ``N``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from tekfac.chunks import example_ranges
from tekfac.layers import KroneckerLayer


@dataclass(eq=False)
class Call:
    """One recorded call of a layer.

    Attributes:
        forward: index of the model forward that made the call.
        inputs: the layer's detached input, batched (one unbatched example as a batch of one).
        shape: the shape of its output, batched likewise.
        edge: the gradient edge of its output (MC Fisher, until the sampled backward).
        grad: the gradient w.r.t. the output, once known.
    """

    forward: int
    inputs: Tensor
    shape: torch.Size
    edge: GradientEdge | None = None
    grad: Tensor | None = None

    @property
    def num_examples(self) -> int:
        """The examples of the call's input."""
        return self.inputs.shape[0]

    def receive(self, grad: Tensor) -> None:
        """Record the gradient of the differentiated tensor (see
        :func:`tekfac.capture._differentiated`) as the gradient w.r.t. the output."""
        self.grad = grad.detach().reshape(self.shape)


@dataclass(eq=False)
class LayerBatch:
    """The recorded examples of one layer in one step, grouped by model forward.

    Attributes:
        layer: the layer.
        groups: its calls, one list per model forward.
    """

    layer: KroneckerLayer
    groups: list[list[Call]]

    @property
    def num_examples(self) -> int:
        """``N``: the examples of all forwards (micro-batches) together."""
        return sum(group[0].num_examples for group in self.groups)

    def mean(self, fn: Callable[[Examples], Sequence[Tensor]], dtype: torch.dtype,
             grad_multiplier: float = 1.0) -> list[Tensor]:
        """The batch mean of the per-forward means ``fn(examples)``, the forwards weighted by
        their example counts (arguments as for :meth:`examples`)."""
        n = self.num_examples
        total: list[Tensor] | None = None
        for examples in self.examples(dtype, grad_multiplier):
            part = [t * (examples.n / n) for t in fn(examples)]
            total = part if total is None else [x + y for x, y in zip(total, part)]
        return total  # type: ignore[return-value]

    def examples(self, dtype: torch.dtype, grad_multiplier: float = 1.0) -> Iterator[Examples]:
        """The examples of every forward, in ``dtype``, with ``g`` times ``grad_multiplier``;
        calls of one forward are concatenated along ``T``."""
        layer = self.layer
        for group in self.groups:
            g = [layer.output_gradients(c.grad.to(dtype)) for c in group]
            g = torch.cat(g, dim=1) if len(g) > 1 else g[0]
            inputs = [c.inputs.to(dtype) if c.inputs.is_floating_point() else c.inputs
                      for c in group]  # an embedding's indices stay integers
            yield Examples(layer, inputs, g * grad_multiplier if grad_multiplier != 1 else g)


@dataclass(eq=False)
class Examples:
    """The examples of one layer in one model forward, as the statistics need them.

    Attributes:
        layer: the layer.
        inputs: the input of each of the forward's calls of the layer, each ``(n, ...)``.
        g: the output gradients ``(n, T, d_out)``, the calls concatenated along ``T``.
    """

    layer: KroneckerLayer
    inputs: list[Tensor]
    g: Tensor

    @property
    def n(self) -> int:
        return self.g.shape[0]

    def input_moment(self, weights: Tensor | None = None) -> Tensor:
        """``Σ_i w_i A_i A_i^T``, shape ``(d_in, d_in)`` (its diagonal ``(d_in,)`` for a
        diagonal input side), without materialising the patches where that is cheaper (see
        :meth:`KroneckerLayer.input_moment`)."""
        return sum(self.layer.input_moment(x, weights) for x in self.inputs).to(self.g.dtype)

    def input_sq_norms(self) -> Tensor:
        """``tr(A_i A_i^T)`` per example, shape ``(n,)``."""
        return sum(self.layer.input_sq_norms(x) for x in self.inputs).to(self.g.dtype)

    def gradients(self) -> Iterator[Tensor]:
        """``D_i = G_i A_i^T`` of every example, ``(m, d_out, d_in)`` for consecutive ranges of
        ``m`` examples of at most about ``CHUNK_ELEMENTS`` elements, the forward's calls
        summed; patches are never unfolded (see :meth:`KroneckerLayer.example_gradients`)."""
        layer = self.layer
        locations = [layer.locations(x) for x in self.inputs]
        for part in example_ranges(self.n, layer.d_out * layer.d_in):
            calls = zip(self.inputs, self.g[part].split(locations, dim=1))
            total = None
            for x, g in calls:
                d = layer.example_gradients(x[part], g)
                total = d if total is None else total.add_(d)
            yield total

    def pieces(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``a (m, T, d_in)`` and ``g (m, T, d_out)`` for consecutive ranges of ``m``
        examples, each ``a`` of at most about ``CHUNK_ELEMENTS`` elements: patches are
        unfolded piece by piece, so the whole batch's patches never exist at once."""
        for part in example_ranges(self.n, self.g.shape[1] * self.layer.d_in):
            a = torch.cat([self.layer.inputs(x[part]) for x in self.inputs], dim=1)
            yield a.to(self.g.dtype), self.g[part]
