"""The patch statistics of a convolution, by unfolding and by spatial correlation
(:mod:`tekfac.patch_moments`), against patches taken from the Jacobian of the layer output
w.r.t. its weight (no unfolding code shared with the package)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev

import tekfac
import tekfac.chunks
from tekfac import patch_moments
from tekfac.layers import make_layer
from tests.reference import layer_references

PATHS = {"unfold": False, "correlation": True}


def jacobian_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``A_i`` of shape ``(N, d_in, T)``: output channel 0 differentiated w.r.t. weight row 0,
    plus a row of ones for the bias."""
    weight = conv.weight.detach()

    def first_channel(w0, xi):
        w = torch.cat([w0[None], weight[1:]])
        return functional_call(conv, {"weight": w, "bias": None}, (xi[None],))[0, 0].flatten()

    a = torch.stack([jacrev(first_channel)(weight[0], xi).flatten(1).T for xi in x])
    if conv.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], dim=1)
    return a


@st.composite
def convs(draw):
    """A Conv1d/Conv2d with random channels, kernel, stride, dilation, padding and padding
    mode, with an input of shape (N, C, ...) it accepts."""
    two_d = draw(st.booleans())
    c_in = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 4))) if two_d else draw(
        st.integers(1, 4))
    axes = 2 if two_d else 1  # stride and dilation drawn per spatial axis
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(axes))
    same = draw(st.booleans())
    stride = (1,) * axes if same else tuple(draw(st.integers(1, 3)) for _ in range(axes))
    padding = "same" if same else draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    reach = max(r * (k - 1) for r, k in zip(dilation, kernel if two_d else (kernel,)))
    size = draw(st.integers(reach + 3, 9))
    conv = (nn.Conv2d if two_d else nn.Conv1d)(
        c_in, 2, kernel, stride=stride, padding=padding, dilation=dilation,
        bias=draw(st.booleans()), padding_mode=mode).double()
    n = draw(st.integers(1, 4))
    shape = (n, c_in, size, size - 1) if two_d else (n, c_in, size)
    return conv, torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=convs())
def test_input_moment_and_norms_equal_the_jacobian_patches(case, path, monkeypatch):
    """``Σ_i w_i A_i A_iᵀ`` and ``tr(A_i A_iᵀ)`` by either path equal those of the exact
    patches, for every padding, padding mode, stride and dilation."""
    asked = []
    monkeypatch.setattr(patch_moments, "correlation_is_cheaper",
                        lambda *_: asked.append(1) or PATHS[path])
    monkeypatch.setattr(tekfac.chunks, "CHUNK_ELEMENTS", 50)  # a few examples at a time
    assert len(tekfac.chunks.example_ranges(2, 50)) == 2
    conv, x = case
    layer = make_layer("conv", conv)
    a = jacobian_patches(conv, x)
    w = torch.rand(len(x), dtype=torch.float64)
    torch.testing.assert_close(layer.input_moment(x, w), torch.einsum("n,nit,njt->ij", w, a, a),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.input_moment(x), torch.einsum("nit,njt->ij", a, a),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.input_sq_norms(x), a.square().sum(dim=(1, 2)),
                               rtol=1e-10, atol=1e-12)
    assert asked  # the path was chosen by the patched rule


def test_correlation_is_chosen_where_it_needs_fewer_flops():
    """The benchmark CNN's 5×5/32-channel convolution on 14×14 (padding 2): unfolding needs
    ``2·T·(C·25)²`` FLOPs per example. The correlation computes, for every kernel row
    difference ``Δ ∈ [0, 4]``, the products between the ``5·C`` (kernel column, channel)
    pairs on each of the ``14 + 4 - Δ`` input rows it reads, over the 14 output columns:
    ``2·14·(5C)²·80``, 4.4× fewer. A 1×1 convolution gains nothing."""
    conv = nn.Conv2d(32, 64, 5, padding=2)
    _, geo = make_layer("", conv).padded(torch.zeros(1, 32, 14, 14))
    assert geo == patch_moments.Geometry((5, 5), (1, 1), (1, 1), (14, 14))
    rows = sum(18 - d for d in range(5))
    assert rows == 80
    assert patch_moments.moment_flops(32, geo) == (2 * 196 * 800**2, 2 * 14 * rows * 160**2)
    assert patch_moments.correlation_is_cheaper(32, geo)
    # the correlation runs along the longer kernel axis: a Conv1d gains as much as a k×1 kernel
    tall, wide = (make_layer("", nn.Conv2d(32, 64, k)).padded(torch.zeros(1, 32, 17, 17))[1]
                  for k in ((7, 1), (1, 7)))
    assert patch_moments.moment_flops(32, tall) == patch_moments.moment_flops(32, wide)
    conv1d = make_layer("", nn.Conv1d(32, 64, 5))
    assert patch_moments.correlation_is_cheaper(32, conv1d.padded(torch.zeros(1, 32, 100))[1])
    pointwise = make_layer("", nn.Conv2d(32, 64, 1))
    assert not patch_moments.correlation_is_cheaper(
        32, pointwise.padded(torch.zeros(1, 32, 14, 14))[1])


@pytest.mark.parametrize("method", ["kfac", "tekfac"])
def test_both_paths_give_the_reference_curvature(method, monkeypatch):
    """Through the whole preconditioner (MC-free empirical Fisher, bias and no bias, weighted
    trace-restricted factors): the KFAC/TKFAC factors by either path equal the reference."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(3, 2, (3, 2), stride=(2, 1), bias=False), nn.Flatten(),
                        nn.Linear(2 * 3 * 5, 3)).double()
    x = torch.randn(4, 2, 7, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    refs = layer_references(net, x, y)
    for use in PATHS.values():
        asked = []
        monkeypatch.setattr(patch_moments, "correlation_is_cheaper",
                            lambda *_, u=use, asked=asked: asked.append(1) or u)
        model = copy.deepcopy(net)
        pre = tekfac.Preconditioner(model, method, fisher="empirical", cov_update_freq=1,
                                    eigen_update_freq=1, scale_update_freq=1)
        F.cross_entropy(model(x), y).backward()
        pre.update_curvature()
        for layer, ref in zip(pre.layers, refs.values()):
            state = pre.states[layer]
            if method == "kfac":
                expected = ref.kfac_factors()
            else:
                phi, psi, _ = ref.trace_restricted_factors()
                expected = (phi, psi)
            torch.testing.assert_close((state.factor_in, state.factor_out), expected,
                                       rtol=1e-9, atol=1e-12)
        assert asked
