"""Hooks that record what the statistics need from each supported layer (DESIGN.md §5).

While ``recording`` is on, every training-mode call of a tracked layer with gradients enabled
is recorded as a :class:`Call`: its input, and either its output gradient from the user's
backward (empirical Fisher, through a hook on the output) or its output, kept so that the
sampled backward can differentiate it (MC Fisher). Nothing is recorded in eval mode, under
``torch.no_grad``, or when recording is off.

Calls are tagged with the model forward they belong to (a pre-hook on the model counts
forwards). :meth:`Capture.batch` joins them per layer: calls of one forward are the same
examples seen several times (weight sharing, recurrence), so they are concatenated along the
locations ``T`` (KFAC-expand); different forwards are different examples (gradient
accumulation over micro-batches), concatenated along the batch ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tekfac.layers import KroneckerLayer


@dataclass(eq=False)
class Call:
    """One recorded call of a layer.

    Attributes:
        forward: index of the model forward that made the call.
        inputs: the layer's detached input.
        output: its output, still in the graph (MC Fisher, until the sampled backward).
        grad: the gradient w.r.t. the output, once known.
    """

    forward: int
    inputs: Tensor
    output: Tensor | None = None
    grad: Tensor | None = None


class Capture:
    """Per-step records of the tracked layers.

    Attributes:
        recording: whether the current step collects statistics.
        calls: layer → its calls of this step, in order.
    """

    def __init__(self, model: nn.Module, layers: list[KroneckerLayer], keep_outputs: bool):
        self.recording = False
        self.keep_outputs = keep_outputs
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
            call = Call(self._forward, args[0].detach())
            if self.keep_outputs:
                call.output = output
            else:
                output.register_hook(lambda grad: setattr(call, "grad", grad.detach()))
            self.calls.setdefault(layer, []).append(call)

        return forward_hook

    def pending_outputs(self) -> list[Call]:
        """Calls whose output still awaits the sampled backward (MC Fisher)."""
        return [c for calls in self.calls.values() for c in calls if c.output is not None]

    @property
    def has_inputs(self) -> bool:
        return any(self.calls.values())

    def batch(self, layer: KroneckerLayer, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """``a (N, T, d_in)`` and raw ``g (N, T, d_out)`` in ``dtype`` of the calls that
        received an output gradient (see the module docstring for how calls are joined);
        ``None`` if none did."""
        calls = [c for c in self.calls.get(layer, ()) if c.grad is not None]
        if not calls:
            return None
        groups: dict[int, list[Call]] = {}
        for call in calls:
            groups.setdefault(call.forward, []).append(call)
        a_parts, g_parts = [], []
        for group in groups.values():
            a = [layer.inputs(c.inputs.to(dtype)) for c in group]
            g = [layer.output_gradients(c.grad.to(dtype)) for c in group]
            if len({x.shape[0] for x in a}) > 1:
                raise RuntimeError(
                    f"Layer {layer.name!r} was called on batches of different sizes "
                    f"{[x.shape[0] for x in a]} within one forward; tekfac treats repeated calls "
                    "in one forward as the same examples (weight sharing). Exclude the layer or "
                    "call it once per example batch")
            a_parts.append(torch.cat(a, dim=1))
            g_parts.append(torch.cat(g, dim=1))
        return torch.cat(a_parts), torch.cat(g_parts)

    def clear(self) -> None:
        """Forget this step's records."""
        self.calls.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
