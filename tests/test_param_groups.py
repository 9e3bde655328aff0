"""Param groups and losses as training scripts write them (docs/design.md §4.5–6): nanoGPT's
decay / no-decay groups, per-group options for the first-order parameters, schedulers per
group, checkpoints, validation; and ``loss="nll"`` for models that end in ``log_softmax``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
from tests.conftest import batch, train

FAST = dict(cov_update_freq=2, eigen_update_freq=3, scale_update_freq=2)
EVERY = dict(cov_update_freq=1, eigen_update_freq=1, scale_update_freq=1)


def small_net() -> nn.Module:
    """Two tracked Linear layers ('0', '3') around a first-order LayerNorm ('1')."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def nanogpt_groups(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """nanoGPT's split: matrices decay; biases and norm parameters do not."""
    params = list(net.parameters())
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


# ------------------------------------------------------------------------- the update
@pytest.mark.parametrize("grouping", ["one group", "two groups, same options", "tensors"])
def test_groups_with_the_constructors_options_change_nothing(method, grouping):
    """Everything in one group (or split into groups with the same options) is bit for bit
    the optimizer built without ``params``."""
    options = dict(lr=0.3, momentum=0.9, weight_decay=0.01, kl_clip=1e-4, seed=1, **FAST)
    net, grouped_net = small_net(), small_net()
    decay, no_decay = nanogpt_groups(grouped_net)
    params = {"one group": [{"params": decay + no_decay}],
              "two groups, same options": [{"params": decay}, {"params": no_decay}],
              "tensors": decay + no_decay}[grouping]
    opt = tekfac.KroneckerOptimizer(net, method, **options)
    grouped = tekfac.KroneckerOptimizer(grouped_net, method, params=params, **options)
    data = [batch((5,)) for _ in range(5)]
    train(net, opt, data)
    train(grouped_net, grouped, data)
    for p, q in zip(net.parameters(), grouped_net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_decay_and_no_decay_groups_take_the_hand_computed_step(method):
    """Weights (lr 0.3, decay 0.1) and biases and LayerNorm (lr 0.1, no decay): a layer's
    direction comes from its one block, with each parameter's own coupled decay in ``∇``;
    ``ν = min(1, √(κ / Σ_p lr_p² ⟨Δ_p, ∇_p⟩))`` is one factor for the whole model; each
    parameter then steps with its own group's rate."""
    net = small_net()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    decay, no_decay = nanogpt_groups(net)
    lr_w, lr_b, wd, kl_clip = 0.3, 0.1, 0.1, 1e-4
    opt = tekfac.KroneckerOptimizer(
        net, method, params=[{"params": decay, "lr": lr_w, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}],
        lr=lr_b, momentum=0.9, kl_clip=kl_clip, damping=0.05, fisher="empirical", **EVERY)
    x, y = batch((5,))
    F.cross_entropy(net(x), y).backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    opt.step()

    deltas, quadratic = {}, 0.0
    for layer in opt.preconditioner.layers:
        w, b = f"{layer.name}.weight", f"{layer.name}.bias"
        g = torch.cat([grads[w] + wd * before[w], grads[b][:, None]], dim=1)
        dense = opt.curvature(layer.module).dense(damped=True)
        d = torch.linalg.solve(dense, g.reshape(-1)).reshape(g.shape)
        deltas[w], deltas[b] = d[:, :-1], d[:, -1]
        quadratic += (lr_w**2 * (d[:, :-1] * g[:, :-1]).sum()
                      + lr_b**2 * (d[:, -1] * g[:, -1]).sum()).item()
    nu = min(1.0, math.sqrt(kl_clip / quadratic))
    assert nu < 1  # the clip is active
    for name, p in net.named_parameters():
        lr = lr_w if p.dim() >= 2 else lr_b
        step = nu * deltas[name] if name in deltas else grads[name]  # LayerNorm: first order
        torch.testing.assert_close(p.detach(), before[name] - lr * step, rtol=1e-9, atol=1e-12)


def test_a_first_order_group_is_torch_sgd_with_its_own_options():
    """LayerNorm in its own group (lr, momentum, Nesterov, coupled decay) follows
    ``torch.optim.SGD`` with those options, whatever the other groups do (to rounding: at a
    constant rate the momentum on updates is SGD's momentum on directions)."""
    net = small_net()
    norm = list(net[1].parameters())
    others = [p for p in net.parameters() if all(p is not q for q in norm)]
    group = dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.01)
    opt = tekfac.TEKFAC(net, params=[{"params": others},
                                     {"params": norm, "decoupled_weight_decay": False, **group}],
                        lr=0.2, momentum=0.9, weight_decay=1e-3, decoupled_weight_decay=True,
                        fisher="empirical", **FAST)
    twins = [nn.Parameter(p.detach().clone()) for p in norm]
    sgd = torch.optim.SGD(twins, foreach=False, **group)
    for _ in range(4):
        x, y = batch((5,))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for twin, p in zip(twins, norm):
            twin.grad = p.grad.clone()
        opt.step()
        sgd.step()
    for twin, p in zip(twins, norm):
        torch.testing.assert_close(p, twin, rtol=1e-12, atol=1e-15)


def test_a_scheduler_sets_each_groups_rate():
    """``LambdaLR`` with one lambda per group: each group's rate follows its own schedule,
    and the steps equal those of a twin whose rates (and peak rates) are set by hand."""
    def build(model: nn.Module) -> tekfac.KroneckerOptimizer:
        decay, no_decay = nanogpt_groups(model)
        return tekfac.TEKFAC(model, params=[{"params": decay}, {"params": no_decay, "lr": 0.05}],
                             lr=0.2, momentum=0.9, kl_clip=1e-3, fisher="empirical", **FAST)

    net, twin = small_net(), small_net()
    opt, by_hand = build(net), build(twin)
    schedules = [lambda s: 0.5**s, lambda s: 1.0 + s]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules)
    for s in range(4):
        rates = [0.2 * schedules[0](s), 0.05 * schedules[1](s)]
        assert [group["lr"] for group in opt.param_groups] == pytest.approx(rates)
        for group, rate in zip(by_hand.param_groups, rates):
            group["lr"] = rate
        data = [batch((5,))]
        train(net, opt, data, mc=False)
        train(twin, by_hand, data, mc=False)
        sched.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_groups_must_agree_on_kl_clip():
    """κ bounds the whole model's step: a group edited to another κ stops the step before
    anything changes."""
    net = small_net()
    decay, no_decay = nanogpt_groups(net)
    opt = tekfac.KFAC(net, params=[{"params": decay}, {"params": no_decay}], fisher="empirical")
    opt.param_groups[1]["kl_clip"] = 1e-2
    x, y = batch((5,))
    F.cross_entropy(net(x), y).backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"kl_clip.*same value in every group"):
        opt.step()
    assert opt.preconditioner.steps == 0
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


# ------------------------------------------------------------------------- checkpoints
def test_resume_with_groups_is_bit_identical(tmp_path):
    def build(model: nn.Module, lr: float) -> tekfac.KroneckerOptimizer:
        decay, no_decay = nanogpt_groups(model)
        return tekfac.EKFAC(model, params=[
            {"params": decay, "weight_decay": 0.1},
            {"params": no_decay, "lr": 0.02, "momentum": 0.5, "nesterov": True}],
            lr=lr, **FAST)

    net = small_net()
    opt = build(net, lr=0.1)
    data = [batch((5,)) for _ in range(8)]
    train(net, opt, data[:4])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
    train(net, opt, data[4:])

    resumed = small_net()
    opt2 = build(resumed, lr=0.7)  # the checkpoint's options win, as in torch.optim
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.02]
    train(resumed, opt2, data[4:])
    for p, q in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="number of parameter groups"):
        tekfac.EKFAC(small_net(), **FAST).load_state_dict(ckpt["opt"])


# ------------------------------------------------------------------------- validation
def _all(net: nn.Module) -> list[nn.Parameter]:
    return list(net.parameters())


INVALID_GROUPS = {  # case → (params of the net, error, message)
    "missing": (lambda n: [{"params": [n[0].weight, n[3].weight]}], ValueError,
                r"\['0.bias', '1.weight', '1.bias', '3.bias'\] are in no param group"),
    "in two groups": (lambda n: [{"params": _all(n)}, {"params": [n[3].bias]}], ValueError,
                      r"'3.bias' in param group 1: it is already in param group 0"),
    "twice in a group": (lambda n: [{"params": [*_all(n), n[0].weight]}], ValueError,
                         r"'0.weight' in param group 0: it is already in this group"),
    "foreign": (lambda n: [{"params": [*_all(n), nn.Parameter(torch.zeros(2))]}], ValueError,
                r"shape \(2,\) in param group 0: it is not a parameter of the model"),
    "a module": (lambda n: [{"params": [n[0]]}], TypeError, "expected parameters of the model"),
    "lr": (lambda n: [{"params": _all(n)[:2]}, {"params": _all(n)[2:], "lr": -1.0}],
           ValueError, r"Invalid lr in param group 1: -1.0"),
    "momentum": (lambda n: [{"params": _all(n), "momentum": 1.0}], ValueError,
                 "Invalid momentum in param group 0"),
    "weight_decay": (lambda n: [{"params": _all(n), "weight_decay": "0.1"}], TypeError,
                     "Invalid weight_decay in param group 0"),
    "nesterov": (lambda n: [{"params": _all(n), "nesterov": "yes"}], TypeError,
                 "Invalid nesterov in param group 0"),
    "nesterov without momentum": (
        lambda n: [{"params": _all(n), "nesterov": True, "momentum": 0.0}], ValueError,
        "momentum=0 in param group 0: Nesterov needs momentum > 0"),
    "unknown option": (lambda n: [{"params": _all(n), "betas": (0.9, 0.99)}], ValueError,
                       r"\['betas'\] in param group 0; a param group may set lr, momentum"),
    "kl_clip": (lambda n: [{"params": _all(n), "kl_clip": 1e-2}], ValueError,
                "'kl_clip' in param group 0.*pass kl_clip to the constructor"),
    "no params": (lambda n: [{"lr": 0.1}], ValueError, "param group 0: it has no 'params'"),
    "not a dict": (lambda n: [{"params": _all(n)[:2]}, _all(n)[2:]], TypeError,
                   "expected a dict"),
}


@pytest.mark.parametrize("case", list(INVALID_GROUPS))
def test_invalid_groups_are_refused_with_what_is_wrong(case):
    groups, error, match = INVALID_GROUPS[case]
    net = small_net()
    with pytest.raises(error, match=match):
        tekfac.TEKFAC(net, params=groups(net))
    # the failed optimizer left no hooks behind
    assert not net._forward_pre_hooks and not any(m._forward_hooks for m in net.modules())


def test_add_param_group_takes_unfrozen_layers_to_the_first_order_step():
    """Fine-tuning: a layer frozen at construction got no Kronecker block; unfrozen and
    added later, it takes the first-order step with its group's options. Parameters already
    in a group, or not the model's, are refused and leave the groups unchanged."""
    net = small_net()
    net[3].requires_grad_(False)
    opt = tekfac.KFAC(net, lr=0.1, momentum=0.0, kl_clip=None, fisher="empirical")
    assert [la.name for la in opt.preconditioner.layers] == ["0"]
    with pytest.raises(ValueError, match=r"'0\.weight' in param group 1: it is already in "
                                         r"param group 0"):
        opt.add_param_group({"params": net[0].weight})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 1
    net[3].requires_grad_(True)
    opt.add_param_group({"params": net[3].parameters(), "lr": 0.05})
    assert opt.param_groups[1]["momentum"] == 0.0  # the constructor's value fills in
    x, y = batch((5,))
    F.cross_entropy(net(x), y).backward()
    weight, grad = net[3].weight.detach().clone(), net[3].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net[3].weight.detach(), weight - 0.05 * grad)


# ------------------------------------------------------------------------- loss="nll"
N, T, D, C = 16, 3, 4, 5
#: layout → (the tensor given to the loss from (N, [T,] C) logits, its labels' shape, T)
NLL_LAYOUTS = {
    "(N, C)": (lambda z: z, (N,), 1),
    "(N*T, C)": (lambda z: z.reshape(-1, C), (N * T,), T),
    "(N, C, T)": (lambda z: z.transpose(1, 2), (N, T), T),
}


@pytest.mark.parametrize("layout", list(NLL_LAYOUTS))
def test_nll_of_log_softmax_has_the_curvature_of_cross_entropy(layout):
    """``loss="nll"`` on log-probabilities draws the labels ``loss="cross_entropy"`` draws
    on the logits (same seed), so the layers' output gradients, hence the curvature, and
    the user's gradients agree; ``log_softmax`` is applied along the loss's class axis."""
    view, label_shape, t = NLL_LAYOUTS[layout]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    x = torch.randn(N, t, D, dtype=torch.float64) if t > 1 else torch.randn(N, D).double()
    y = torch.randint(0, C, label_shape)
    results = []
    for loss in ("cross_entropy", "nll"):
        pre = tekfac.Preconditioner(net, "kfac", loss=loss, seed=0, **EVERY)
        outputs = view(net(x))
        if loss == "nll":
            outputs = outputs.log_softmax(dim=1)
        user = F.cross_entropy(outputs, y) if loss == "cross_entropy" else F.nll_loss(outputs, y)
        net.zero_grad()
        pre.backward(user, outputs)
        recorded = [c.grad.clone() for la in pre.layers for c in pre.capture.calls[la]]
        pre.update_curvature()
        results.append((recorded, [pre.curvature(la.module).dense() for la in pre.layers],
                        [p.grad.clone() for p in net.parameters()]))
        pre.remove_hooks()
    for a, b in zip(*results, strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v)


def test_nll_samples_the_labels_cross_entropy_samples():
    logits = torch.randn(64, 7, 3, dtype=torch.float64) * 3
    draws = []
    for loss, outputs in (("cross_entropy", logits), ("nll", logits.log_softmax(dim=1))):
        generator = torch.Generator().manual_seed(5)
        draws.append(tekfac.fisher.sample_targets(loss, outputs, generator))
    assert draws[0].shape == (64, 3)
    assert torch.equal(*draws)


def test_nll_samples_non_finite_positions_without_raising():
    """Log-probabilities all ``-inf`` (or NaN) at a position: its loss is non-finite and the
    step is skipped anyway, so the sampler draws uniformly there instead of raising."""
    outputs = torch.randn(4, 3).log_softmax(dim=1)
    outputs[1] = float("-inf")
    outputs[2, 0] = float("nan")
    labels = tekfac.fisher.sample_targets("nll", outputs, torch.Generator().manual_seed(0))
    assert labels.shape == (4,) and ((labels >= 0) & (labels < 3)).all()


def test_group_dicts_given_to_an_earlier_optimizer_are_accepted():
    """torch.optim fills every option into the group dicts, κ included: the same dicts (the
    model's κ) build a second optimizer; another κ in them is still refused."""
    net = small_net()
    decay, no_decay = nanogpt_groups(net)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay}]
    first = tekfac.KFAC(net, params=groups, fisher="empirical")
    first.preconditioner.remove_hooks()
    assert groups[0]["kl_clip"] == 1e-3
    tekfac.KFAC(net, params=groups, fisher="empirical").preconditioner.remove_hooks()
    with pytest.raises(ValueError, match="'kl_clip' in param group 0"):
        tekfac.KFAC(net, params=groups, fisher="empirical", kl_clip=1e-2)
