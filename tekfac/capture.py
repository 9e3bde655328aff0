"""Hooks that record what the statistics need from each supported layer (DESIGN.md §5).

While ``recording`` is on, every training-mode call of a tracked layer with gradients enabled
is recorded as a :class:`Call`: its input, and either its output gradient from the user's
backward (empirical Fisher, through a hook on the output) or the output's gradient edge, so
that the sampled backward can differentiate it (MC Fisher). The edge names the node that made
the output, not the output itself: the output's memory is freed as soon as the graph no longer
needs it, and an activation applied to it in place (``ReLU(inplace=True)``) does not change
what is differentiated. When the output merely reshapes a tensor of the same call (see
:func:`_differentiated`), hook and edge go on that tensor. Nothing is recorded in eval mode,
under ``torch.no_grad``, or when recording is off.

Calls are tagged with the model forward they belong to (a pre-hook on the model counts
forwards). :meth:`Capture.batch` joins them per layer: calls of one forward are the same
examples seen several times (weight sharing, recurrence), so they are concatenated along the
locations ``T`` (KFAC-expand); different forwards are different examples (gradient
accumulation over micro-batches), concatenated along the batch ``N``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from tekfac import factors
from tekfac.layers import KroneckerLayer


@dataclass(eq=False)
class Call:
    """One recorded call of a layer.

    Attributes:
        forward: index of the model forward that made the call.
        inputs: the layer's detached input.
        shape: the shape of its output.
        edge: the gradient edge of its output (MC Fisher, until the sampled backward).
        grad: the gradient w.r.t. the output, once known.
    """

    forward: int
    inputs: Tensor
    shape: torch.Size
    edge: GradientEdge | None = None
    grad: Tensor | None = None

    def receive(self, grad: Tensor) -> None:
        """Record the gradient of the differentiated tensor (see :func:`_differentiated`) as
        the gradient w.r.t. the output."""
        self.grad = grad.detach().reshape(self.shape)


class Capture:
    """Per-step records of the tracked layers.

    Attributes:
        recording: whether the current step collects statistics.
        calls: layer → its calls of this step, in order.
    """

    def __init__(self, model: nn.Module, layers: list[KroneckerLayer], keep_edges: bool):
        self.recording = False
        self.keep_edges = keep_edges
        self.calls: dict[KroneckerLayer, list[Call]] = {}
        self._forward = 0
        self._handles = [model.register_forward_pre_hook(self._count_forward)]
        self._handles += [layer.module.register_forward_hook(self._hook(layer))
                          for layer in layers]

    def _count_forward(self, module: nn.Module, args: tuple) -> None:
        self._forward += 1

    def _hook(self, layer: KroneckerLayer):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not (self.recording and module.training and torch.is_grad_enabled()
                    and output.requires_grad):
                return
            call = Call(self._forward, args[0].detach(), output.shape)
            target = _differentiated(output)
            if self.keep_edges:
                call.edge = get_gradient_edge(target)
            else:
                target.register_hook(call.receive)
            self.calls.setdefault(layer, []).append(call)

        return forward_hook

    def pending(self) -> list[Call]:
        """Calls whose output still awaits the sampled backward (MC Fisher)."""
        return [c for calls in self.calls.values() for c in calls if c.edge is not None]

    @property
    def has_inputs(self) -> bool:
        return any(self.calls.values())

    def batch(self, layer: KroneckerLayer, forwards: set[int] | None = None
              ) -> LayerBatch | None:
        """This step's calls of ``layer`` that received an output gradient, grouped by forward
        (see the module docstring), only those of ``forwards`` if given; ``None`` if none."""
        groups: dict[int, list[Call]] = {}
        for call in self.calls.get(layer, ()):
            if call.grad is not None and (forwards is None or call.forward in forwards):
                groups.setdefault(call.forward, []).append(call)
        for group in groups.values():
            sizes = [c.inputs.shape[0] if c.inputs.dim() > 1 else 1 for c in group]
            if len(set(sizes)) > 1:
                raise RuntimeError(
                    f"Layer {layer.name!r} was called on batches of different sizes {sizes} "
                    "within one forward; tekfac treats repeated calls in one forward as the same "
                    "examples (weight sharing). Exclude the layer or call it once per batch")
        return LayerBatch(layer, list(groups.values())) if groups else None

    def clear(self) -> None:
        """Forget this step's records."""
        self.calls.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


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
        return sum(_examples(group[0]) for group in self.groups)

    def examples(self, dtype: torch.dtype, grad_multiplier: float = 1.0) -> Iterator[Examples]:
        """The examples of every forward, in ``dtype``, with ``g`` times ``grad_multiplier``;
        calls of one forward are concatenated along ``T``."""
        layer = self.layer
        for group in self.groups:
            g = [layer.output_gradients(_batched(c.grad).to(dtype)) for c in group]
            g = torch.cat(g, dim=1) if len(g) > 1 else g[0]
            yield Examples(layer, [_batched(c.inputs).to(dtype) for c in group],
                           g * grad_multiplier if grad_multiplier != 1 else g)


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
        """``Σ_i w_i A_i A_i^T``, shape ``(d_in, d_in)``, without materialising the patches
        where that is cheaper (see :meth:`KroneckerLayer.input_moment`)."""
        return sum(self.layer.input_moment(x, weights) for x in self.inputs)

    def input_sq_norms(self) -> Tensor:
        """``tr(A_i A_i^T)`` per example, shape ``(n,)``."""
        return sum(self.layer.input_sq_norms(x) for x in self.inputs)

    def gradients(self) -> Iterator[Tensor]:
        """``D_i = G_i A_i^T`` of every example, ``(m, d_out, d_in)`` for consecutive ranges of
        ``m`` examples of at most about ``CHUNK_ELEMENTS`` elements, the forward's calls
        summed; patches are never unfolded (see :meth:`KroneckerLayer.example_gradients`)."""
        layer = self.layer
        locations = [layer.locations(x) for x in self.inputs]
        for part in factors.example_ranges(self.n, layer.d_out * layer.d_in):
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
        for part in factors.example_ranges(self.n, self.g.shape[1] * self.layer.d_in):
            yield torch.cat([self.layer.inputs(x[part]) for x in self.inputs], dim=1), \
                self.g[part]


def _differentiated(output: Tensor) -> Tensor:
    """The tensor whose gradient is recorded for a layer's ``output``: the output itself, or
    the tensor it merely reshapes (same memory, same order), as ``nn.Linear`` returns for
    inputs of more than two dimensions or of one, and a convolution for unbatched inputs. An
    in-place op on such a view (``ReLU(inplace=True)``) takes the view off the graph's path,
    so that its own hook or edge would receive no gradient; its base's still receive the
    gradient w.r.t. the layer's output."""
    base = output._base
    if (base is not None and base.numel() == output.numel() and base.is_contiguous()
            and output.is_contiguous() and base.data_ptr() == output.data_ptr()):
        return base
    return output


def _examples(call: Call) -> int:
    return call.inputs.shape[0] if call.inputs.dim() > 1 else 1


def _batched(t: Tensor) -> Tensor:
    """A batched tensor as is; an unbatched (1-d) tensor as a batch of one example."""
    return t if t.dim() > 1 else t[None]
