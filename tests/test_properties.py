"""Property-based checks of docs/design.md §2 over random small architectures (hypothesis)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tekfac
from tests.reference import layer_references

EVERY = dict(fisher="empirical", cov_update_freq=1, eigen_update_freq=1, scale_update_freq=1)
TOL = dict(rtol=1e-7, atol=1e-9)
SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_nets(draw):
    """A Conv1d or Conv2d with random kernel/stride/padding/dilation/bias, then a Linear."""
    two_d = draw(st.booleans())
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    same = draw(st.booleans())
    stride = 1 if same else draw(st.integers(1, 2))
    padding = "same" if same else draw(st.integers(0, 2))
    bias = draw(st.booleans())
    size = draw(st.integers(dilation * (kernel - 1) + 1, 6))
    conv = (nn.Conv2d if two_d else nn.Conv1d)(c_in, c_out, kernel, stride=stride,
                                               padding=padding, dilation=dilation, bias=bias)
    shape = (c_in, size, size) if two_d else (c_in, size)
    with torch.no_grad():
        flat = conv(torch.zeros(1, *shape)).numel()
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3)).double()
    return net, shape


@st.composite
def mlps(draw):
    widths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    layers, fan_in = [], draw(st.integers(1, 5))
    shape = (fan_in,)
    for w in widths:
        layers += [nn.Linear(fan_in, w, bias=draw(st.booleans())), nn.Tanh()]
        fan_in = w
    layers.append(nn.Linear(fan_in, 3))
    return nn.Sequential(*layers).double(), shape


def check_properties(net, shape, n, method):
    x = torch.randn(n, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    refs = layer_references(net, x, y)
    pre = tekfac.Preconditioner(net, method, **EVERY)
    F.cross_entropy(net(x), y).backward()
    pre.update_curvature()
    for module, ref in refs.items():
        curv = pre.curvature(module)
        u_out, u_in = curv.eigenbasis()
        q = torch.kron(u_out, u_in)
        fisher = ref.fisher
        if method == "kfac":
            torch.testing.assert_close(curv.dense(), ref.kfac_dense(), **TOL)
        elif method == "tkfac":
            torch.testing.assert_close(curv.dense(), ref.tkfac_dense(), **TOL)
        else:
            torch.testing.assert_close(curv.scaling().reshape(-1),
                                       torch.diagonal(q.T @ fisher @ q), **TOL)
            plain = ref.kfac_dense() if method == "ekfac" else ref.tkfac_dense()
            err = (curv.dense() - fisher).norm()
            # the best diagonal in this basis is at least as close as the Kronecker one
            kron_in_basis = (q * torch.diagonal(q.T @ plain @ q)) @ q.T
            assert err <= (kron_in_basis - fisher).norm() * (1 + 1e-7) + 1e-12
        if method != "kfac":
            torch.testing.assert_close(curv.trace(), fisher.trace(), **TOL)
        if n == 1 and ref.T == 1:
            torch.testing.assert_close(curv.dense(), fisher, **TOL)


@SETTINGS
@given(net=conv_nets(), n=st.integers(1, 6), method=st.sampled_from(list(tekfac.METHODS)),
       seed=st.integers(0, 2**16))
def test_conv_properties(net, n, method, seed):
    torch.manual_seed(seed)
    check_properties(*net, n, method)


@SETTINGS
@given(net=mlps(), n=st.integers(1, 6), method=st.sampled_from(list(tekfac.METHODS)),
       seed=st.integers(0, 2**16))
def test_mlp_properties(net, n, method, seed):
    torch.manual_seed(seed)
    check_properties(*net, n, method)
