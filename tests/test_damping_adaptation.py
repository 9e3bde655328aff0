"""Adaptive (Levenberg–Marquardt) damping, docs/design.md §3.

The reduction ratio compares the loss change of the step taken with the quadratic model
``∇Lᵀδ + ½ δᵀ(c·F̂)δ``. Checked against exact algebra: ``c·F̂`` is the curvature of the loss as
the user reduced it (output Hessians from ``torch.func``, every layout of the Fisher tests);
``δᵀF̂δ`` against ``dense()``; where ``c·F̂`` is the exact Hessian (a Linear layer, squared
loss) ρ = 1 to rounding and the damping falls to its floor; a model that underestimates the
curvature raises the damping, one that overestimates it lowers it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

import tekfac
from tekfac.damping_adaptation import DampingAdaptation, reduction_ratio
from tests.conftest import batch, tiny_net, train
from tests.test_fisher import CASES, LAYOUTS, C, D, N, loss_outputs, sequence_model, user_loss

METHODS = list(tekfac.METHODS)


# ---------------------------------------------------------------- c·F̂ is the loss's curvature
def expected_output_factor(loss: str, logits: torch.Tensor, t: int, reduction: str) -> torch.Tensor:
    """The exact expectation over the MC labels of the last layer's ``G = (1/N) Σ_i G_i G_iᵀ``
    (``logits (N, t, C)``); per position ``E[g gᵀ]`` is the output-space Fisher of one loss
    term, divided by the ``K`` terms each example's loss averages over (1 for a sum)."""
    if loss in ("cross_entropy", "nll"):
        p = logits.softmax(-1)
        fisher, k = torch.diag_embed(p) - p[..., :, None] * p[..., None, :], t
    elif loss == "mse":
        fisher, k = 2 * torch.eye(C, dtype=logits.dtype).expand(N, t, C, C), t * C
    else:
        s = logits.sigmoid()
        fisher, k = torch.diag_embed(s * (1 - s)), t * C
    k = k if reduction == "mean" else 1
    return fisher.sum(dim=(0, 1)) / (N * k**2)


def output_hessian(loss: str, view, logits: torch.Tensor, t: int, reduction: str) -> torch.Tensor:
    """``Σ_{i,t} ∂²L/∂z_it²`` (``C × C``) of the user's loss w.r.t. the last layer's outputs."""
    def batch_loss(z: torch.Tensor) -> torch.Tensor:
        outputs = loss_outputs(loss, view(z if t > 1 else z[:, 0]))
        value = user_loss(loss, outputs)
        if reduction == "sum":
            value = value * outputs.numel() / (outputs.shape[1] if loss in ("cross_entropy",
                                                                             "nll") else 1)
        return value

    h = hessian(batch_loss)(logits).reshape(N * t, C, N * t, C)
    return torch.stack([h[r, :, r, :] for r in range(N * t)]).sum(dim=0)


@pytest.mark.parametrize(("loss", "layout", "reduction"),
                         [(*case, "mean") for case in CASES] + [("cross_entropy", "(N*T, C)",
                                                                  "sum")])
def test_curvature_multiplier_turns_the_expected_fisher_into_the_losss_curvature(
        loss, layout, reduction):
    view, t = LAYOUTS[layout]
    net = sequence_model()
    x = torch.randn(N, t, D, dtype=torch.float64) if t > 1 else torch.randn(N, D,
                                                                            dtype=torch.float64)
    pre = tekfac.Preconditioner(net, "kfac", loss=loss, reduction=reduction, seed=0)
    logits = net(x)
    outputs = loss_outputs(loss, view(logits))
    pre.backward(user_loss(loss, outputs), outputs)
    c = pre.curvature_multiplier()
    logits = logits.detach().reshape(N, t, C)
    expected = output_hessian(loss, view, logits, t, reduction)
    assert torch.allclose(c * expected_output_factor(loss, logits, t, reduction), expected,
                          rtol=1e-10, atol=1e-12), (c, expected)


@pytest.mark.parametrize(("loss", "layout"), CASES)
def test_a_plain_backward_infers_the_multiplier_from_the_last_layer(loss, layout):
    """After ``loss.backward()`` (empirical Fisher, no outputs given) ``c`` comes from the
    output of the last tracked layer, its class axis that layer's features: the same ``c``
    as from the outputs given to ``optimizer.backward`` in every layout of the Fisher tests."""
    view, t = LAYOUTS[layout]
    net = sequence_model()
    x = torch.randn(N, t, D, dtype=torch.float64) if t > 1 else torch.randn(N, D,
                                                                            dtype=torch.float64)
    pre = tekfac.Preconditioner(net, "kfac", fisher="empirical", loss=loss)
    outputs = loss_outputs(loss, view(net(x)))
    user_loss(loss, outputs).backward()
    inferred = pre.curvature_multiplier()
    pre.backward(user_loss(loss, loss_outputs(loss, view(net(x)))), outputs)
    assert inferred == pre.curvature_multiplier() == (t if loss in ("cross_entropy", "nll")
                                                       else t * C)


@pytest.mark.parametrize("method", METHODS)
def test_quadratic_form_is_the_dense_one(method):
    net, shape = tiny_net("cnn")
    opt = tekfac.KroneckerOptimizer(net, method, cov_update_freq=1, eigen_update_freq=2)
    train(net, opt, [batch(shape) for _ in range(3)])
    gen = torch.Generator().manual_seed(1)
    for layer in opt.preconditioner.layers:
        curvature = opt.curvature(layer.module)
        m = torch.randn(layer.d_out, layer.d_in, dtype=torch.float64, generator=gen)
        v = m.reshape(-1)
        assert torch.allclose(curvature.quadratic_form(m), v @ curvature.dense() @ v,
                              rtol=1e-10)


def closure_for(opt, net, x, y, loss_fn=F.cross_entropy):
    """The closure of one step on ``(x, y)``, through the optimizer's backward."""
    def closure():
        opt.zero_grad()
        out = net(x)
        loss = loss_fn(out, y)
        opt.backward(loss, out)
        return loss
    return closure


# ---------------------------------------------------------------- ρ against exact algebra
D_IN, D_OUT = 3, 2


def linear_problem(t: int, n: int):
    """A Linear layer on ``n`` examples of ``t`` positions, MSE to fixed targets: the loss is
    exactly quadratic in ``[W | b]``, its Hessian ``I ⊗ B``."""
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT).double()
    x = torch.randn(n, t, D_IN, dtype=torch.float64)
    y = torch.randn(n, t, D_OUT, dtype=torch.float64)
    return layer, x, y


def exact_hessian_block(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``B`` with ``∂²L/∂vec[W|b]² = I ⊗ B`` (asserted), by ``torch.func``."""
    def loss_of(matrix: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x @ matrix[:, :-1].T + matrix[:, -1], torch.zeros(*x.shape[:2], D_OUT,
                                                                           dtype=x.dtype))
    m = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()
    h = hessian(loss_of)(m).reshape(D_OUT * (D_IN + 1), D_OUT * (D_IN + 1))
    block = h[: D_IN + 1, : D_IN + 1].contiguous()
    assert torch.allclose(h, torch.kron(torch.eye(D_OUT, dtype=h.dtype), block), atol=1e-12)
    return block


def install(opt, block: torch.Tensor, factor: float) -> None:
    """Make the layer's ``c·F̂`` equal ``factor`` × the exact Hessian ``I ⊗ block``, with
    ``c = T·d_out`` (MSE averaged over each example's ``T·d_out`` entries, docs/design.md §1)."""
    pre = opt.preconditioner
    (layer,) = pre.layers
    state = pre.states[layer]
    c = pre.curvature_multiplier()
    eig, basis = torch.linalg.eigh(block * factor / c)
    state.basis_in, state.eig_in = basis, eig
    state.basis_out, state.eig_out = torch.eye(D_OUT, dtype=eig.dtype), torch.ones(D_OUT,
                                                                                    dtype=eig.dtype)
    state.scaling = torch.ones(D_OUT, 1, dtype=eig.dtype) * eig[None, :]


def adaptive_run(method: str, t: int, n: int, factor: float, steps: int, lr: float,
                 damping: float = 0.1, decay: float = 0.5):
    """``steps`` adaptive steps with ``c·F̂`` = ``factor`` × the exact Hessian; the ratios and
    the dampings after each step."""
    layer, x, y = linear_problem(t, n)
    never = 10**6
    opt = tekfac.KroneckerOptimizer(
        layer, method, loss="mse", lr=lr, momentum=0.0, kl_clip=None, damping=damping,
        damping_floor=1e-6,
        damping_adaptive=DampingAdaptation(interval=1, decay=decay), cov_update_freq=never,
        eigen_update_freq=never, scale_update_freq=never)
    closure = closure_for(opt, layer, x, y, F.mse_loss)
    opt.param_groups[0]["lr"] = 0.0  # step 0 builds the state, replaced below by the exact
    opt.step(closure)
    opt.param_groups[0]["lr"] = lr
    install(opt, exact_hessian_block(layer, x), factor)
    ratios, dampings = [], []
    for _ in range(steps):
        opt.step(closure)
        ratios.append(opt.reduction_ratio)
        dampings.append(opt.damping)
    return ratios, dampings


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("t", "n"), [(1, 1), (3, 1), (3, 4)])
def test_ratio_is_one_where_the_model_is_exact_and_the_damping_falls_to_its_floor(method, t, n):
    ratios, dampings = adaptive_run(method, t, n, factor=1.0, steps=20, lr=0.3)
    assert ratios == pytest.approx([1.0] * len(ratios), abs=1e-7)
    assert dampings[-1] == 1e-6  # 0.1 halved 17 times, then the floor


def test_a_model_that_underestimates_the_curvature_raises_the_damping():
    """``c·F̂ = H/10``: with ``lr = 1`` the step ``≈ 10 H⁻¹∇`` overshoots: actual
    ``-10q + 50q``, predicted ``-10q + 5q`` (``q = ∇ᵀH⁻¹∇``), ``ρ ≈ -8``."""
    ratios, dampings = adaptive_run("tekfac", 1, 1, factor=0.1, steps=3, lr=1.0, damping=1e-3,
                                    decay=0.9)
    assert ratios[0] == pytest.approx(-8.0, rel=0.05)
    assert dampings == pytest.approx([1e-3 / 0.9 ** k for k in (1, 2, 3)])


def test_a_model_that_overestimates_the_curvature_lowers_the_damping():
    """``c·F̂ = 10 H``: with ``lr = 1`` the step ``≈ H⁻¹∇/10`` is timid; actual
    ``-q/10 + q/200``, predicted ``-q/10 + q/20``: ``ρ ≈ 1.9``."""
    ratios, dampings = adaptive_run("tekfac", 1, 1, factor=10.0, steps=1, lr=1.0, damping=1e-3,
                                    decay=0.9)
    assert ratios[0] == pytest.approx(1.9, rel=0.05)
    assert dampings == pytest.approx([0.9e-3])


# ---------------------------------------------------------------- the rule itself
def test_rule_thresholds_and_floor():
    rule = DampingAdaptation(interval=5)
    assert rule.omega == pytest.approx(0.95**5)
    assert rule.adapted(1.0, 0.9, 0.0) == pytest.approx(0.95**5)
    assert rule.adapted(1.0, 0.1, 0.0) == pytest.approx(0.95**-5)
    assert rule.adapted(1.0, 0.5, 0.0) == 1.0
    assert rule.adapted(1.0, None, 0.0) == 1.0
    assert rule.adapted(1e-9, 0.9, 1e-8) == 1e-8
    assert [rule.due(s) for s in range(6)] == [True, False, False, False, False, True]
    assert reduction_ratio(-1.0, -2.0) == 0.5
    assert reduction_ratio(float("nan"), -2.0) == float("-inf")
    assert reduction_ratio(1.0, 0.0) is None
    assert reduction_ratio(-1.0, 3.0) is None


@pytest.mark.parametrize("kwargs", [dict(interval=0), dict(decay=1.0), dict(decay=0.0),
                                    dict(lower=0.8, upper=0.5), dict(lower=-0.1)])
def test_invalid_adaptation_is_refused(kwargs):
    with pytest.raises(ValueError, match="damping adaptation"):
        DampingAdaptation(**kwargs)


def test_invalid_option_and_missing_closure_are_refused():
    net = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="damping_adaptive"):
        tekfac.TEKFAC(net, damping_adaptive="yes")
    with pytest.raises(ValueError, match="grad_scaler"):
        tekfac.TEKFAC(net, damping_adaptive=True,
                      grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    opt = tekfac.TEKFAC(net, damping_adaptive=True)
    out = net(torch.randn(4, 3))
    loss = F.cross_entropy(out, torch.zeros(4).long())
    opt.backward(loss, out)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_a_closure_calling_loss_backward_is_told_what_to_call():
    net = nn.Linear(3, 2)
    opt = tekfac.TEKFAC(net, fisher="empirical", damping_adaptive=True)
    x, y = torch.randn(4, 3), torch.zeros(4).long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"optimizer.backward\(loss, outputs\)"):
        opt.step(closure)


# ---------------------------------------------------------------- side effects, checkpoints
def bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(4 * 6 * 6, 5))



def test_the_second_evaluation_leaves_buffers_and_random_state_as_they_were():
    """One step with adaptation equals the same step without it: parameters, BatchNorm
    buffers, the RNG state after it (dropout draws the same masks in both evaluations)."""
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    results = []
    for adaptive in (False, True):
        net = bn_dropout_net()
        opt = tekfac.TEKFAC(net, lr=0.1, damping_adaptive=adaptive)
        torch.manual_seed(1)
        opt.step(closure_for(opt, net, x, y))
        results.append(([p.detach().clone() for p in net.parameters()],
                         [b.clone() for b in net.buffers()], torch.get_rng_state()))
        if adaptive:
            # dropout masks equal in both evaluations: the ratio is that of a deterministic
            # loss; a fresh mask would change the loss by far more than the model predicts
            assert opt.reduction_ratio is not None
    (p0, b0, r0), (p1, b1, r1) = results
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    assert torch.equal(r0, r1)


def test_the_adapted_damping_is_checkpointed_and_a_resumed_run_is_identical():
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))

    def build():
        net = bn_dropout_net().eval()  # no dropout: the resumed run must be bit-identical
        return net, tekfac.EKFAC(net, lr=0.1, cov_update_freq=2, damping_adaptive=
                                 DampingAdaptation(interval=2, decay=0.5))

    net, opt = build()
    for _ in range(6):
        opt.step(closure_for(opt, net, x, y))
    assert opt.damping != 0.1
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["param_groups"][0]["tekfac"]["damping"] == opt.damping
    for _ in range(4):
        opt.step(closure_for(opt, net, x, y))
    net2, opt2 = build()
    net2.load_state_dict(saved_net)
    opt2.load_state_dict(saved_opt)
    assert opt2.damping == saved_opt["param_groups"][0]["tekfac"]["damping"]
    for _ in range(4):
        opt2.step(closure_for(opt2, net2, x, y))
    assert opt2.damping == opt.damping
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
