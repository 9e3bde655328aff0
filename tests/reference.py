"""Dense float64 references, built independently of the package (docs/design.md §2).

Per-example gradients ``D_i`` come from ``torch.func`` (``vmap`` of ``grad`` of a
``functional_call``); ``G_i`` from plain autograd through a zero probe added to the layer
output; ``A_i`` from the Jacobian of the layer output w.r.t. its weight (no unfolding code is
shared with the package). ``D_i = G_i A_i^T`` is asserted, which checks all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

LOSSES = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}


@dataclass
class LayerReference:
    """Per-example quantities of one layer: ``A (N, d_in, T)``, ``G (N, d_out, T)``,
    ``D (N, d_out, d_in)``, in the row-major ``[W.flatten(1) | b]`` convention."""

    A: Tensor
    G: Tensor
    D: Tensor

    @property
    def fisher(self) -> Tensor:
        """``F = E[vec D_i vec D_i^T]``, ``(p, p)``."""
        d = self.D.flatten(1)
        return d.T @ d / len(d)

    @property
    def T(self) -> int:
        return self.A.shape[-1]

    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """``A = E[A_i A_i^T]/T``, ``G = E[G_i G_i^T]``."""
        a = torch.einsum("nit,njt->ij", self.A, self.A) / (len(self.A) * self.T)
        g = torch.einsum("nit,njt->ij", self.G, self.G) / len(self.G)
        return a, g

    def trace_restricted_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``Φ, Ψ`` (trace one) and ``δ = E||D_i||_F^2``."""
        lam = torch.einsum("nit,njt->nij", self.A, self.A)
        gam = torch.einsum("nit,njt->nij", self.G, self.G)
        tr_lam = lam.diagonal(dim1=1, dim2=2).sum(-1)
        tr_gam = gam.diagonal(dim1=1, dim2=2).sum(-1)
        phi = (tr_gam[:, None, None] * lam).mean(0)
        psi = (tr_lam[:, None, None] * gam).mean(0)
        delta = self.D.square().sum(dim=(1, 2)).mean()
        return _unit_trace(phi), _unit_trace(psi), delta

    def kfac_dense(self) -> Tensor:
        a, g = self.kfac_factors()
        return torch.kron(g, a)

    def tkfac_dense(self) -> Tensor:
        phi, psi, delta = self.trace_restricted_factors()
        return delta * torch.kron(psi, phi)


def _unit_trace(m: Tensor) -> Tensor:
    """``m / tr m``; a zero matrix (a layer whose inputs or output gradients are all zero, e.g.
    a strided convolution that reads only padding) stays zero."""
    trace = m.trace()
    return m / trace if trace > 0 else m


def _layer_matrix_params(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    if _is_hf_conv1d(module):
        return module.weight.shape[0] + (module.bias is not None)
    return module.weight[0].numel() + (module.bias is not None)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (weight ``(d_in, d_out)``, ``y = x W + b``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith(
        "transformers")


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, LAYERS) or _is_hf_conv1d(module)


LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def layer_matrix(weight: Tensor, bias: Tensor | None) -> Tensor:
    """Per-example ``[dW.flatten(1) | db]`` of shape ``(N, d_out, d_in)`` from ``(N, *W.shape)``
    weight and ``(N, d_out)`` bias gradients (``None`` without a bias)."""
    pieces = [weight.flatten(2)] + ([bias[..., None]] if bias is not None else [])
    return torch.cat(pieces, dim=2)


def layer_references(model: nn.Module, x: Tensor, y: Tensor,
                     loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
                     reduction: str = "mean") -> dict[nn.Module, LayerReference]:
    """References for every Linear/Conv/Embedding layer of ``model`` on the batch ``(x, y)``.

    The per-example loss is the training loss on the single example (so a batch-mean loss
    times N), as in docs/design.md §1: ``loss`` names one of :data:`LOSSES` (with
    ``reduction``), or is the training loss itself as a function of the model output and the
    labels, called on batches of one example.
    """
    loss_fn = loss if callable(loss) else partial(LOSSES[loss], reduction=reduction)
    layers = [m for m in model.modules() if _is_layer(m)]
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = {m: n for n, m in model.named_modules()}

    def example_loss(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi[None],))
        return loss_fn(out, yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)

    refs = {}
    for layer in layers:
        name = names[layer]
        if isinstance(layer, nn.Embedding):  # M = W^T
            d = per_example[f"{name}.weight"].transpose(1, 2)
        elif _is_hf_conv1d(layer):  # M = [W^T | b]
            d = layer_matrix(per_example[f"{name}.weight"].transpose(1, 2),
                             per_example.get(f"{name}.bias"))
        else:
            d = layer_matrix(per_example[f"{name}.weight"], per_example.get(f"{name}.bias"))
        a_list, g_list = [], []
        for i in range(len(x)):
            a_i, g_i = _example_a_g(model, layer, x[i:i + 1], y[i:i + 1], loss_fn)
            a_list.append(a_i)
            g_list.append(g_i)
        ref = LayerReference(torch.stack(a_list), torch.stack(g_list), d)
        torch.testing.assert_close(ref.G @ ref.A.transpose(1, 2), ref.D, rtol=1e-9, atol=1e-10)
        refs[layer] = ref
    return refs


def _example_a_g(model, layer, xi, yi, loss_fn) -> tuple[Tensor, Tensor]:
    """``A_i (d_in, T)`` from the Jacobian of the output w.r.t. the weight; ``G_i (d_out, T)``
    from the gradient of the example's loss w.r.t. a zero probe on the output."""
    store = {}

    def hook(module, args, output):
        store["input"] = args[0].detach()
        probe = torch.zeros_like(output, requires_grad=True)
        store["probe"] = probe
        return output + probe

    handle = layer.register_forward_hook(hook)
    try:
        out = model(xi)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(loss_fn(out, yi), [store["probe"]])
    if isinstance(layer, nn.Embedding):
        return _embedding_a(layer, store["input"]), g.reshape(-1, layer.embedding_dim).T
    transposed = _is_hf_conv1d(layer)
    d_out = layer.weight.shape[1 if transposed else 0]
    g = g.reshape(d_out, -1) if isinstance(layer, nn.Conv1d | nn.Conv2d) else g.reshape(-1, d_out).T

    weight = layer.weight.detach()
    conv = isinstance(layer, nn.Conv1d | nn.Conv2d)
    row = weight[:, 0] if transposed else weight[0]
    no_bias = torch.zeros(d_out, dtype=weight.dtype) if transposed else None  # addmm needs one

    def first_channel(w0: Tensor) -> Tensor:
        """Output channel 0 as a function of row 0 of ``M`` (linear in it, no bias)."""
        w = (torch.cat([w0[:, None], weight[:, 1:]], dim=1) if transposed
             else torch.cat([w0[None], weight[1:]]))
        out = functional_call(layer, {"weight": w, "bias": no_bias}, (store["input"],))
        return out[0, 0] if conv else out[..., 0]

    j = jacrev(first_channel)(row).reshape(g.shape[1], -1)  # (T, d_in without bias)
    a = j.T
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(1, a.shape[1], dtype=a.dtype)], dim=0)
    assert a.shape[0] == _layer_matrix_params(layer)
    return a, g


def _embedding_a(layer: nn.Embedding, tokens: Tensor) -> Tensor:
    """``A_i (V, T)`` of an embedding: the Jacobian of output channel 0 w.r.t. column 0 of the
    weight (row 0 of ``M = W^T``), a one-hot column per token; the ``padding_idx`` row gets no
    gradient, so its column is zero."""
    weight = layer.weight.detach()

    def first_channel(column: Tensor) -> Tensor:
        w = torch.cat([column[:, None], weight[:, 1:]], dim=1)
        return F.embedding(tokens, w).reshape(-1, weight.shape[1])[:, 0]

    a = jacrev(first_channel)(weight[:, 0]).T  # (V, T)
    if layer.padding_idx is not None:
        a[layer.padding_idx] = 0
    return a
