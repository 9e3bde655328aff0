"""Hooks that record what the statistics need from each supported layer (DESIGN.md §5).

While ``recording`` is on, a training-mode forward with gradients enabled stores each
layer's input; then either a hook on its output records the output gradient of the user's
backward (empirical Fisher) or the output itself is kept so that an extra backward of a
sampled loss can differentiate it (MC Fisher). Nothing is recorded in eval mode, under
``torch.no_grad``, or when recording is off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tekfac.layers import KroneckerLayer


class Capture:
    """Per-step records of the tracked layers.

    Attributes:
        recording: whether the current step collects statistics.
        inputs: layer → its detached input of this step.
        outputs: layer → its output (MC Fisher only, still attached to the graph).
        output_grads: layer → gradient w.r.t. its output, as the loss produced it.
    """

    def __init__(self, layers: list[KroneckerLayer], keep_outputs: bool):
        self.recording = False
        self.keep_outputs = keep_outputs
        self.inputs: dict[KroneckerLayer, Tensor] = {}
        self.outputs: dict[KroneckerLayer, Tensor] = {}
        self.output_grads: dict[KroneckerLayer, Tensor] = {}
        self._handles = [
            layer.module.register_forward_hook(self._hook(layer)) for layer in layers
        ]

    def _hook(self, layer: KroneckerLayer):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not (self.recording and module.training and torch.is_grad_enabled()
                    and output.requires_grad):
                return
            if layer in self.inputs:
                raise RuntimeError(
                    f"Layer {layer.name!r} ran twice in one statistics step. Weight sharing "
                    "and several forwards per optimizer step are not supported: call "
                    "optimizer.step() after each forward/backward, or exclude this layer")
            self.inputs[layer] = args[0].detach()
            if self.keep_outputs:
                self.outputs[layer] = output
            else:
                output.register_hook(self._grad_hook(layer))

        return forward_hook

    def _grad_hook(self, layer: KroneckerLayer):
        def grad_hook(grad: Tensor) -> None:
            self.output_grads[layer] = grad.detach()

        return grad_hook

    def clear(self) -> None:
        """Forget this step's records."""
        self.inputs.clear()
        self.outputs.clear()
        self.output_grads.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
