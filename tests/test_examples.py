"""Per-example quantities of :class:`tekfac.records.Examples` — the gradients ``D_i``, their
squared norms (``δ``) and the corrected scaling — against per-example gradients taken by
``torch.func`` (``vmap`` of ``grad``), for every branch of the cost-based choices; and the
output-side factors for every layout of the output gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tekfac import chunks, factors
from tekfac.layers import make_layer
from tekfac.records import Examples
from tekfac.scaling import corrected_scaling
from tests.reference import layer_matrix

#: (module, input shape per example, calls per forward); comments: the branches taken by
#: δ (Gram or gradients) and by the corrected scaling (rotate D_i, or rotate a and g)
CASES = {
    "linear": (nn.Linear(5, 4), (5,), 1),  # T = 1
    "sequence-gram": (nn.Linear(6, 4), (2, 6), 1),  # Gram; rotate a, g
    "sequence": (nn.Linear(3, 4), (4, 3), 1),  # gradients; rotate a, g
    "conv2d": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 5), 1),  # gradients; rotate D
    "conv2d-shared": (nn.Conv2d(2, 3, (2, 3), dilation=(1, 2), padding=(1, 0), bias=False),
                      (2, 4, 6), 2),  # a layer called twice per forward
    "conv1d-gram": (nn.Conv1d(3, 4, 2, stride=2, padding_mode="circular", padding=1), (3, 3),
                    1),  # Gram; rotate a, g
}


def reference_gradients(module: nn.Module, xs: list[torch.Tensor], gys: list[torch.Tensor]
                        ) -> torch.Tensor:
    """``D_i = ∂/∂M Σ_calls ⟨module(x_i), gy_i⟩`` as ``[dW.flatten(1) | db]``, ``(N, d_out,
    d_in)``."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def inner(p, x_i, gy_i):
        return sum((functional_call(module, p, (x[None],))[0] * g).sum()
                   for x, g in zip(x_i, gy_i))

    grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, xs, gys)
    return layer_matrix(grads["weight"], grads.get("bias"))


@pytest.fixture(params=list(CASES))
def case(request, monkeypatch):
    """A layer's Examples (chunked into pieces of a few examples) and the exact ``D_i``."""
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 100)
    assert len(chunks.example_ranges(2, 100)) == 2  # the patch reaches the chunking
    torch.manual_seed(0)
    module, shape, calls = CASES[request.param]
    module = module.double()
    layer = make_layer("layer", module)
    xs = [torch.randn(5, *shape, dtype=torch.float64) for _ in range(calls)]
    gys = [torch.randn_like(module(x)) for x in xs]
    g = [layer.output_gradients(gy) for gy in gys]  # a convolution's: a transposed view
    g = g[0] if calls == 1 else torch.cat(g, dim=1)  # as LayerBatch.examples builds it
    return Examples(layer, xs, g), reference_gradients(module, xs, gys)


def test_gradients_are_the_per_example_gradients(case):
    ex, d = case
    torch.testing.assert_close(torch.cat(list(ex.gradients())), d)


def test_squared_norms(case):
    ex, d = case
    torch.testing.assert_close(factors.example_sq_norms(ex), d.square().sum(dim=(1, 2)))


def test_corrected_scaling_is_the_second_moment_in_the_basis(case):
    ex, d = case
    d_out, d_in = d.shape[1:]
    basis_in = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))[0]
    basis_out = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))[0]
    expected = (basis_out.T @ d @ basis_in).square().mean(dim=0)
    torch.testing.assert_close(corrected_scaling(ex, basis_in, basis_out), expected)


def test_output_side_factors(case):
    """``Σ_i G_i G_iᵀ / N`` and its ``tr(A_i A_iᵀ)``-weighted form, whether ``g`` is contiguous
    (Linear, several calls) or a convolution's transposed view with ``T ≥ d_out``
    (per-example products) or ``T < d_out`` ("conv1d-gram": one product)."""
    ex, _ = case
    g, n = ex.g, ex.n
    _, kfac_out = factors.FACTOR_KINDS["kronecker"].factors(ex)
    torch.testing.assert_close(kfac_out, torch.einsum("ntd,nte->de", g, g) / n)
    _, tkfac_out = factors.FACTOR_KINDS["trace_restricted"].factors(ex)
    weights = ex.input_sq_norms()
    torch.testing.assert_close(tkfac_out,
                               torch.einsum("n,ntd,nte->de", weights, g, g) / n)
