"""Hooks that record what the statistics need from each supported layer (docs/design.md §5).

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
forwards); :meth:`Capture.batch` groups them per layer into a
:class:`tekfac.records.LayerBatch`. Under ``torch.compile`` the recording runs eagerly,
outside the compiled graph, on statistics steps only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from tekfac.layers import EmbeddingLayer, KroneckerLayer
from tekfac.records import Call, LayerBatch


class Capture:
    """Per-step records of the tracked layers.

    Attributes:
        recording: whether the current step collects statistics.
        calls: layer → its calls of this step, in order.
        last_layer: the layer of the latest recorded call (the one nearest the outputs).
        examples: the example count of the latest call of a tracked layer, recorded or not
            (``None`` before the first).
        width, positions: that call's output features (or channels) and its output
            positions per example (``T``; 1 for an ``(N, d_out)`` output).
    """

    def __init__(self, model: nn.Module, layers: list[KroneckerLayer], keep_edges: bool):
        self.recording = False
        self.keep_edges = keep_edges
        self.calls: dict[KroneckerLayer, list[Call]] = {}
        self.last_layer: KroneckerLayer | None = None
        self.examples: int | None = None
        self.width = self.positions = 1
        self._forward = 0
        self._input_batch: dict[int, int] = {}  # forward → the batch size of the model input
        self._handles = [model.register_forward_pre_hook(self._count_forward, with_kwargs=True)]
        self._handles += [layer.module.register_forward_hook(self._hook(layer))
                          for layer in layers]

    def _count_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Number the forward, and note the batch size of its first tensor input (keyword
        arguments included: Hugging Face models take only those)."""
        self._forward += 1
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor) and value.dim() > 0:
                self._input_batch[self._forward] = value.shape[0]
                break

    def _hook(self, layer: KroneckerLayer):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.examples = layer.batched(args[0]).shape[0]
            self.width = layer.d_out
            self.positions = output.numel() // max(self.examples * layer.d_out, 1)
            if (self.recording and module.training and torch.is_grad_enabled()
                    and output.requires_grad):
                record(args[0], output)

        # Under torch.compile the bookkeeping above is traced (steps without statistics keep
        # whole graphs), while the recording runs eagerly, outside the graph: a graph break
        # per tracked layer, on statistics steps only.
        @torch.compiler.disable
        def record(x: Tensor, output: Tensor) -> None:
            inputs = layer.batched(x.detach())
            shape = output.shape if inputs.dim() == x.dim() else (1, *output.shape)
            call = Call(self._forward, inputs, torch.Size(shape))
            target = _differentiated(output)
            if self.keep_edges:
                call.edge = get_gradient_edge(target)
            else:
                target.register_hook(call.receive)
            self.calls.setdefault(layer, []).append(call)
            self.last_layer = layer

        return forward_hook

    def pending(self) -> list[Call]:
        """Calls whose output still awaits the sampled backward (MC Fisher)."""
        return [c for calls in self.calls.values() for c in calls if c.edge is not None]

    @property
    def has_inputs(self) -> bool:
        return any(self.calls.values())

    def batches(self, forwards: set[int] | None = None) -> dict[KroneckerLayer, LayerBatch]:
        """:meth:`batch` of every layer called this step that has one."""
        batches = {layer: self.batch(layer, forwards) for layer in self.calls}
        return {layer: b for layer, b in batches.items() if b is not None}

    def batch(self, layer: KroneckerLayer, forwards: set[int] | None = None
              ) -> LayerBatch | None:
        """This step's calls of ``layer`` that received an output gradient, grouped by forward
        (see the module docstring), only those of ``forwards`` if given; ``None`` if none."""
        groups: dict[int, list[Call]] = {}
        for call in self.calls.get(layer, ()):
            if call.grad is not None and (forwards is None or call.forward in forwards):
                groups.setdefault(call.forward, []).append(call)
        for forward, group in groups.items():
            sizes = [c.num_examples for c in group]
            if len(set(sizes)) > 1:
                raise RuntimeError(
                    f"Layer {layer.name!r} was called on batches of different sizes {sizes} "
                    "within one forward; tekfac treats repeated calls in one forward as the same "
                    "examples (weight sharing). Exclude the layer or call it once per batch")
            if ((isinstance(layer, EmbeddingLayer) and group[0].inputs.dim() == 1)
                    or (sizes[0] == 1 and self._input_batch.get(forward, 1) > 1)):
                self._check_not_broadcast(layer, forward, sizes[0])
        return LayerBatch(layer, list(groups.values())) if groups else None

    def _check_not_broadcast(self, layer: KroneckerLayer, forward: int, count: int) -> None:
        """Refuse a layer called on ``count`` examples — an embedding's 1-d input of ``count``
        indices, or one example while the model's first input holds several — when the other
        layers of the same forward see batches of another size: an output broadcast over the
        batch (positions shared by the whole batch, ``wpe(torch.arange(T))``, a Hugging Face
        model's default ``position_ids`` of shape ``(1, T)``; a learned query shared by every
        example), whose per-example gradients are summed before any hook sees them. (A head
        after flattening one sequence, ``T`` rows, next to layers that see its one example is
        no broadcast: the model's input holds one example.)"""
        others = {c.num_examples for la, calls in self.calls.items() if la is not layer
                  for c in calls if c.forward == forward and c.inputs.dim() > 1}
        if not others or count in others:
            return
        raise RuntimeError(
            f"Layer {layer.name!r} ({_kind(layer)}) was called on an input of {count} "
            f"example{'s' if count > 1 else ''} while the other layers of the same forward see "
            f"batches of {sorted(others)}: an output shared by the whole batch (e.g. the "
            "positions of wpe(torch.arange(T)), or a Hugging Face model's "
            "default position_ids of shape (1, T)) is broadcast over the batch, so its "
            "per-example gradients are lost. Give it inputs expanded to the batch "
            "(wpe(torch.arange(T).expand(B, T)); for a Hugging Face model pass "
            "position_ids=torch.arange(T).expand(B, T), or TekfacTrainer(..., "
            "expand_position_ids=True)), or exclude it")

    def clear(self) -> None:
        """Forget this step's records."""
        self.calls.clear()
        self._input_batch.clear()
        self.last_layer = None

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


def _kind(layer: KroneckerLayer) -> str:
    """The layer's module type as users write it (``nn.Embedding``, ``Conv1D``)."""
    kind = type(layer.module)
    return f"nn.{kind.__name__}" if getattr(nn, kind.__name__, None) is kind else kind.__name__


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
