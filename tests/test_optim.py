"""The torch.optim contract, the update rule, options and checkpoints of the optimizers."""

from __future__ import annotations

import copy
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
import tekfac.state
from tests.conftest import MeanOverSequence, batch, curvature_of, set_fields, tiny_net, train

OPTIMIZERS = {"kfac": tekfac.KFAC, "ekfac": tekfac.EKFAC, "tkfac": tekfac.TKFAC,
              "tekfac": tekfac.TEKFAC}
FAST = dict(cov_update_freq=2, eigen_update_freq=3, scale_update_freq=2)


# ------------------------------------------------------------------------- construction
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(weight_decay=-1), ValueError, "weight_decay"),
    (dict(kl_clip=0.0), ValueError, "kl_clip"),
    (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov"),
    (dict(nesterov=1), TypeError, "nesterov"),
    (dict(damping=0.0), ValueError, "damping"),
    (dict(damping=float("nan")), ValueError, "damping"),
    (dict(damping_type="huge"), ValueError, "damping_type"),
    (dict(fisher="true"), ValueError, "fisher"),
    (dict(loss="hinge"), ValueError, "loss"),
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(stat_decay=1.0), ValueError, "stat_decay"),
    (dict(cov_update_freq=0), ValueError, "cov_update_freq"),
    (dict(eigen_update_freq=2.5), ValueError, "eigen_update_freq"),
    (dict(scale_update_freq=True), ValueError, "scale_update_freq"),
    (dict(factor_dtype=torch.int32), TypeError, "factor_dtype"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(exclude=[3]), TypeError, "exclude"),
    (dict(dampin=0.1), TypeError, "dampin"),
])
def test_invalid_arguments_are_refused(kwargs, error, match):
    net, _ = tiny_net("mlp")
    with pytest.raises(error, match=match):
        tekfac.TEKFAC(net, **kwargs)


def test_invalid_method_and_model():
    net, _ = tiny_net("mlp")
    with pytest.raises(ValueError, match="method"):
        tekfac.KroneckerOptimizer(net, "shampoo")
    with pytest.raises(TypeError, match="Module"):
        tekfac.TEKFAC(list(net.parameters()))


def test_grouped_convolution_is_refused_unless_excluded():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"groups=2.*exclude"):
        tekfac.KFAC(net)
    opt = tekfac.KFAC(net, exclude=[net[0]])
    assert [la.name for la in opt.preconditioner.layers] == ["2"]


def test_all_four_accept_the_same_arguments():
    net, _ = tiny_net("cnn")
    args = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, damping=1e-3, fisher="mc",
                stat_decay=0.95, cov_update_freq=10, eigen_update_freq=100,
                scale_update_freq=10, kl_clip=1e-3)
    for name, cls in OPTIMIZERS.items():
        opt = cls(net, **args)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.method == name
        opt.preconditioner.remove_hooks()


# ------------------------------------------------------------------------- update rule
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
def test_without_tracked_layers_it_is_torch_sgd(nesterov, decoupled):
    """Degenerate case: every layer excluded ⇒ exactly torch.optim.SGD (or SGDW)."""
    net, shape = tiny_net("mlp")
    ref = copy.deepcopy(net)
    opt = tekfac.KFAC(net, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01,
                      decoupled_weight_decay=decoupled, exclude=["*"], fisher="empirical")
    assert opt.preconditioner.layers == []
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov,
                          weight_decay=0.0 if decoupled else 0.01)
    for _ in range(4):
        x, y = batch(shape)
        for model, o in ((net, opt), (ref, sgd)):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if decoupled and o is sgd:
                with torch.no_grad():
                    for p in ref.parameters():
                        p.mul_(1 - 0.1 * 0.01)
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_acts_on_updates_each_at_its_own_rate(nesterov):
    """docs/design.md §4.6: ``u ← μu + lr·d``, ``θ ← θ − u`` (Nesterov ``θ ← θ − (lr·d +
    μu)``), the rule of every parameter (here all first-order, ``d`` the gradient). A step at
    rate 0 (a warm-up's first) moves nothing and leaves nothing in the buffer, so the next
    step is ``lr·d`` alone; ``torch.optim.SGD``'s buffer of directions would carry the first
    direction into it at the new rate."""
    net, shape = tiny_net("mlp")
    opt = tekfac.KFAC(net, lr=0.0, momentum=0.9, nesterov=nesterov, exclude=["*"],
                      fisher="empirical")
    updates = []
    for lr in (0.0, 0.1, 0.2):
        opt.param_groups[0]["lr"] = lr
        before = [p.detach().clone() for p in net.parameters()]
        x, y = batch(shape)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        updates.append([(b - p.detach(), lr * p.grad) for b, p in zip(before, net.parameters())])
    for (u0, _), (u1, d1), (u2, d2) in zip(*updates):
        assert torch.equal(u0, torch.zeros_like(u0))
        torch.testing.assert_close(u1, d1 * (1.9 if nesterov else 1.0), rtol=1e-12, atol=0)
        buffer = 0.9 * d1 + d2
        torch.testing.assert_close(u2, d2 + 0.9 * buffer if nesterov else buffer,
                                   rtol=1e-12, atol=1e-15)


def test_first_step_is_kl_clipped_natural_gradient(method):
    net, shape = tiny_net("cnn")
    before = copy.deepcopy(net)
    lr, kl_clip = 0.5, 1e-4
    opt = tekfac.KroneckerOptimizer(net, method, lr=lr, momentum=0.9, kl_clip=kl_clip,
                                    damping=0.05, fisher="empirical", cov_update_freq=1,
                                    eigen_update_freq=1, scale_update_freq=1)
    x, y = batch(shape)
    F.cross_entropy(net(x), y).backward()
    grads = {la: la.gradient_matrix().clone() for la in opt.preconditioner.layers}
    opt.step()
    deltas = {}
    for la, g in grads.items():
        dense = opt.curvature(la.module).dense(damped=True)
        deltas[la] = torch.linalg.solve(dense, g.reshape(-1)).reshape(g.shape)
    vdot = sum((deltas[la] * grads[la]).sum() for la in grads)
    nu = min(1.0, math.sqrt(kl_clip / (lr**2 * vdot.item())))
    assert nu < 1  # the clip is active in this test
    before_layers = dict(before.named_modules())
    for la in opt.preconditioner.layers:
        old = torch.cat([p.detach().reshape(la.d_out, -1) for p in
                         before_layers[la.name].parameters()], dim=1)
        torch.testing.assert_close(la.parameter_matrix(), old - lr * nu * deltas[la],
                                   rtol=1e-9, atol=1e-12)


def test_non_kronecker_parameters_take_the_first_order_step():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 4 * 4, 3)).double()
    opt = tekfac.EKFAC(net, lr=0.1, momentum=0.0, weight_decay=0.01, fisher="empirical")
    bn = net[1]
    x, y = batch((1, 6, 6))
    F.cross_entropy(net(x), y).backward()
    w0, g0 = bn.weight.detach().clone(), bn.weight.grad.clone()
    b0, gb = bn.bias.detach().clone(), bn.bias.grad.clone()
    opt.step()
    torch.testing.assert_close(bn.weight.detach(), w0 - 0.1 * (g0 + 0.01 * w0))
    torch.testing.assert_close(bn.bias.detach(), b0 - 0.1 * (gb + 0.01 * b0))
    assert [la.name for la in opt.preconditioner.layers] == ["0", "4"]


def test_exclude_by_name_pattern():
    net, _ = tiny_net("cnn")
    opt = tekfac.TKFAC(net, exclude=["0", "5*"])
    assert [la.name for la in opt.preconditioner.layers] == ["2"]


def test_every_grouped_convolution_is_named_in_one_error():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1,
                                                                                groups=4))
    with pytest.raises(ValueError, match=r"'0' \(groups=2\), '2' \(groups=4\)"):
        tekfac.KFAC(net)


def test_exclude_entries_that_match_nothing_are_refused():
    net, _ = tiny_net("cnn")
    with pytest.raises(ValueError, match=r"'6'.*matches no module"):
        tekfac.KFAC(net, exclude=["6"])
    with pytest.raises(ValueError, match=r"names parameters.*use '5'"):
        tekfac.KFAC(net, exclude=["5.weight"])
    with pytest.raises(ValueError, match="not a module of the model"):
        tekfac.KFAC(net, exclude=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="not one of the model's"):
        tekfac.KFAC(net, exclude=[nn.Parameter(torch.zeros(2))])


def test_a_parameter_in_exclude_leaves_its_layer_to_the_first_order_step():
    net, shape = tiny_net("cnn")
    opt = tekfac.KFAC(net, exclude=[net[5].bias], lr=0.1, momentum=0.0, kl_clip=None,
                      fisher="empirical", **FAST)
    assert [la.name for la in opt.preconditioner.layers] == ["0", "2"]
    weight = net[5].weight.detach().clone()
    x, y = batch(shape)
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    grad = net[5].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net[5].weight.detach(), weight - 0.1 * grad)


def test_describe_lists_what_is_preconditioned_and_why():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                        nn.Linear(8, 4), nn.Linear(4, 3))
    net[4].weight.requires_grad_(False)
    opt = tekfac.TEKFAC(net, exclude=["3"])
    lines = opt.describe().splitlines()
    assert lines[0].split() == ["module", "type", "parameters", "preconditioning"]
    assert lines[1].split()[:4] == ["0", "Conv2d", "20", "TEKFAC"]
    assert "(2 × 10)" in lines[1]
    assert lines[2].endswith("first-order: BatchNorm2d has no Kronecker block")
    assert lines[3].endswith("first-order: excluded by '3'")
    assert lines[4].endswith("first-order: frozen (requires_grad=False)")
    assert "TEKFAC, 1 Kronecker layers (20 parameters), 3 first-order modules" in repr(opt)


def test_lr_scheduler_drives_the_step():
    net, shape = tiny_net("mlp")
    twin = copy.deepcopy(net)
    opts = [tekfac.TEKFAC(m, lr=0.2, momentum=0.0, fisher="empirical", kl_clip=None)
            for m in (net, twin)]
    sched = torch.optim.lr_scheduler.StepLR(opts[0], step_size=1, gamma=0.5)
    x, y = batch(shape)
    train(net, opts[0], [(x, y)], mc=False)
    sched.step()
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.1)
    # the same two steps with the rate changed by hand give the same parameters
    train(twin, opts[1], [(x, y)], mc=False)
    opts[1].param_groups[0]["lr"] = 0.1
    x2, y2 = batch(shape)
    train(net, opts[0], [(x2, y2)], mc=False)
    train(twin, opts[1], [(x2, y2)], mc=False)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_empirical_fisher_needs_only_the_ordinary_loop(method):
    net, shape = tiny_net("mlp")
    opt = OPTIMIZERS[method](net, fisher="empirical", **FAST)
    train(net, opt, [batch(shape) for _ in range(4)], mc=False)
    assert opt.curvature(net[0]).trace() > 0


def test_mc_fisher_without_sampled_backward_is_an_error():
    net, shape = tiny_net("mlp")
    opt = tekfac.TEKFAC(net)
    x, y = batch(shape)
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match=r"optimizer.backward\(loss, outputs\)"):
        opt.step()


def test_mc_backward_leaves_the_true_gradient():
    net, shape = tiny_net("cnn")
    twin = copy.deepcopy(net)
    opt = tekfac.EKFAC(net)
    x, y = batch(shape)
    out = net(x)
    opt.backward(F.cross_entropy(out, y), out)
    F.cross_entropy(twin(x), y).backward()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    calls = [c for cs in opt.preconditioner.capture.calls.values() for c in cs]
    assert len(calls) == 3 and all(c.grad is not None for c in calls)  # the sampled pass


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("shape", [(5,), (4, 5)])  # (4, 5): Linear returns a view
def test_output_gradient_is_taken_before_an_in_place_activation(fisher, shape):
    """``ReLU(inplace=True)`` rewrites the layer's output (for inputs of more than two
    dimensions a view of ``nn.Linear``'s result); the recorded gradient must still be the one
    w.r.t. the layer's output (zero where the ReLU cut), as with ``ReLU()``."""
    def grads(inplace: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3),
                            *([MeanOverSequence()] if len(shape) > 1 else [])).double()
        opt = tekfac.KFAC(net, seed=3, fisher=fisher)
        x, y = batch(shape, n=16)
        out = net(x)
        loss = F.cross_entropy(out, y)
        opt.backward(loss, out) if fisher == "mc" else loss.backward()
        return [c.grad for cs in opt.preconditioner.capture.calls.values() for c in cs]

    copied, in_place = grads(False), grads(True)
    assert copied[0].shape == (16, *shape[:-1], 6)
    assert (copied[0] == 0).any() and (copied[0] != 0).any()
    for a, b in zip(copied, in_place, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mc_capture_does_not_keep_layer_outputs_alive():
    """Until the sampled backward only the outputs' gradient edges are kept: an output the
    graph does not save (Tanh saves its own result) is freed after the forward."""
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = tekfac.KFAC(net)
    outputs = []
    net[0].register_forward_hook(lambda m, args, out: outputs.append(weakref.ref(out)))
    x, y = batch((5,))
    out = net(x)
    assert outputs[0]() is None
    opt.backward(F.cross_entropy(out, y), out)
    assert all(c.grad is not None for cs in opt.preconditioner.capture.calls.values()
               for c in cs)


def test_sum_reduction_gives_the_same_statistics():
    """A summed loss has the statistics of its mean (per-example gradients either way) and
    ``N`` times its curvature (docs/design.md §3)."""
    net, shape = tiny_net("cnn")
    twin = copy.deepcopy(net)
    every = dict(fisher="empirical", cov_update_freq=1, eigen_update_freq=1,
                 scale_update_freq=1)
    pre_mean = tekfac.Preconditioner(net, "tekfac", **every)
    pre_sum = tekfac.Preconditioner(twin, "tekfac", reduction="sum", **every)
    x, y = batch(shape)
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(twin(x), y, reduction="sum").backward()
    pre_mean.update_curvature()
    pre_sum.update_curvature()
    for a, b in zip(pre_mean.layers, pre_sum.layers):
        mean, summed = pre_mean.curvature(a.module), pre_sum.curvature(b.module)
        assert (mean.multiplier, summed.multiplier) == (1.0, len(x))
        torch.testing.assert_close(mean.dense(), summed.dense() / len(x))


def test_factor_dtype_keeps_statistics_in_that_dtype():
    net, shape = tiny_net("mlp")
    net = net.float()
    opt = tekfac.TEKFAC(net, factor_dtype=torch.float64, fisher="empirical")
    train(net, opt, [batch(shape, dtype=torch.float32)], mc=False)
    state = opt.preconditioner.states[opt.preconditioner.layers[0]]
    assert state.factor_in.dtype == state.scaling.dtype == torch.float64
    assert net[0].weight.dtype == torch.float32


# ------------------------------------------------------------------------- recording
def test_nothing_is_recorded_in_eval_mode_or_without_grad():
    net, shape = tiny_net("mlp")
    opt = tekfac.KFAC(net, fisher="empirical")
    cap = opt.preconditioner.capture
    x, _ = batch(shape)
    assert cap.recording
    with torch.no_grad():
        net(x)
    assert not cap.has_inputs
    net.eval()
    net(x).sum().backward()
    assert not cap.has_inputs
    net.train()
    net(x).sum().backward()
    assert len(cap.calls) == 2
    assert all(len(cs) == 1 and cs[0].grad is not None for cs in cap.calls.values())


def test_nothing_is_recorded_outside_statistics_steps():
    net, shape = tiny_net("mlp")
    opt = tekfac.KFAC(net, fisher="empirical", cov_update_freq=3)
    recorded = []
    for _ in range(6):
        x, y = batch(shape)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        recorded.append(opt.preconditioner.capture.has_inputs)
        opt.step()
    assert recorded == [True, False, False, True, False, False]


def test_curvature_lookup_errors():
    net, _ = tiny_net("mlp")
    opt = tekfac.KFAC(net, fisher="empirical")
    with pytest.raises(RuntimeError, match="no curvature yet"):
        opt.curvature(net[0])
    with pytest.raises(KeyError, match="not tracked"):
        opt.curvature(net[1])
    with pytest.raises(KeyError, match="not tracked"):
        opt.curvature(nn.Linear(2, 2))


# ------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_resume_is_bit_identical(kind, method, tmp_path):
    net, shape = tiny_net(kind)
    opt = OPTIMIZERS[method](net, lr=0.05, weight_decay=1e-3, **FAST)
    data = [batch(shape) for _ in range(12)]
    train(net, opt, data[:5])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
    train(net, opt, data[5:])

    resumed, _ = tiny_net(kind)
    opt2 = OPTIMIZERS[method](resumed, lr=0.05, weight_decay=1e-3, **FAST)
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[5:])
    for p, q in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trips_every_statistic():
    net, shape = tiny_net("cnn")
    opt = tekfac.TEKFAC(net, **FAST)
    train(net, opt, [batch(shape) for _ in range(3)])
    saved = opt.state_dict()
    layer_state = curvature_of(saved)["layers"]["0"]
    assert set(layer_state) == set(tekfac.state.STATE_KEYS) | {"set"}
    assert set_fields(layer_state) == set(tekfac.state.STATE_KEYS)  # all of them set
    assert curvature_of(saved)["steps"] == 3
    assert curvature_of(saved)["seed"] == opt.preconditioner.fisher.seed
    assert all("momentum_buffer" in s for s in saved["state"].values())


def resume_release_0_1_0(method: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters after loading the 0.1.0 checkpoint of ``method`` into this version and
    taking its 3 remaining steps, and the parameters 0.1.0 took them to."""
    saved = torch.load(Path(__file__).parent / "data" / "checkpoint-0.1.0.pt", weights_only=True)
    run = saved["runs"][method]
    net, _ = tiny_net("cnn")
    net.load_state_dict(run["model"])
    opt = tekfac.KroneckerOptimizer(net, method, lr=0.05, seed=0, **FAST)
    opt.load_state_dict(run["optim"])
    assert opt.preconditioner.steps == 3 and opt.preconditioner.fisher.seed == 7
    train(net, opt, saved["batches"][3:])
    return [p.detach() for p in net.parameters()], run["expected"]


def test_checkpoints_of_release_0_1_0_keep_loading(method):
    """``tests/data/checkpoint-0.1.0.pt`` was written by tekfac 0.1.0 (commit 7c2a4eb, before
    the package was split into one module per concern): per method, the model and optimizer
    state after 3 MC steps on the tiny CNN, and the parameters after 3 more. Loaded into this
    version the 3 more steps must land on the same parameters."""
    params, expected = resume_release_0_1_0(method)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_the_stored_expectations_hold_for_any_eigensolver(method, monkeypatch):
    """The stored parameters are machine-independent: another LAPACK may return any
    orthonormal basis of an eigenspace (and other rounding), which EKFAC/TEKFAC's per-vector
    scalings would see where eigenvalues are close. Emulated here by decomposing ``QᵀMQ`` for a
    random orthogonal ``Q`` and rotating back: the same eigenproblem, another valid answer. The
    checkpoint's batches (32 examples, full-rank factors with separated eigenvalues) make the
    answer unique; on the first file's (8 examples, a rank-deficient input factor) EKFAC and
    TEKFAC moved by 3e-5 here, as they did on another CPU."""
    eigh = torch.linalg.eigh
    gen = torch.Generator().manual_seed(0)

    def another_eigensolver(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, _ = torch.linalg.qr(torch.randn(matrix.shape, dtype=matrix.dtype, generator=gen))
        values, vectors = eigh(q.T @ matrix @ q)
        return values, q @ vectors

    monkeypatch.setattr(torch.linalg, "eigh", another_eigensolver)
    params, expected = resume_release_0_1_0(method)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_a_checkpoint_of_another_method_is_refused():
    """A TEKFAC state holds trace-restricted factors and a corrected scaling: loaded into KFAC
    it would silently mean something else. Another damping may be resumed with."""
    net, shape = tiny_net("mlp")
    opt = tekfac.TEKFAC(net, **FAST)
    train(net, opt, [batch(shape) for _ in range(3)])
    saved = opt.state_dict()
    for other in (tekfac.KFAC, tekfac.EKFAC, tekfac.TKFAC):
        with pytest.raises(ValueError, match=r"saved by TEKFAC.*resume with the method"):
            other(net, **FAST).load_state_dict(saved)
    resumed = tekfac.TEKFAC(net, damping=0.3, **FAST)
    resumed.load_state_dict(saved)
    assert resumed.preconditioner.steps == 3


def test_loading_a_mismatched_state_is_a_clear_error():
    net, shape = tiny_net("mlp")
    opt = tekfac.KFAC(net, fisher="empirical")
    train(net, opt, [batch(shape)], mc=False)
    other = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt_other = tekfac.KFAC(other, fisher="empirical")
    with pytest.raises(ValueError, match="shape"):
        opt_other.preconditioner.load_state_dict(curvature_of(opt.state_dict()))
    cnn, _ = tiny_net("cnn")
    with pytest.raises(ValueError, match="does not match"):
        tekfac.KFAC(cnn).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="curvature"):
        tekfac.KFAC(net).load_state_dict(torch.optim.SGD(net.parameters()).state_dict())


def test_add_param_group_refuses_a_tensor_that_is_not_the_models():
    net, _ = tiny_net("mlp")
    opt = tekfac.KFAC(net)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


# ------------------------------------------------------------------------- Preconditioner
def test_preconditioner_pairs_with_any_torch_optimizer():
    net, shape = tiny_net("cnn")
    pre = tekfac.Preconditioner(net, "ekfac", fisher="empirical", cov_update_freq=1,
                                eigen_update_freq=1, scale_update_freq=1)
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = batch(shape)
    F.cross_entropy(net(x), y).backward()
    raw = {la: la.gradient_matrix().clone() for la in pre.layers}
    pre.step()
    for la in pre.layers:
        expected = pre.curvature(la.module).precondition(raw[la])
        torch.testing.assert_close(la.gradient_matrix(), expected)
    adam.step()


# ------------------------------------------------------------------------- real-model idioms
def test_multihead_attention_projections_are_left_to_the_first_order_step():
    """``nn.MultiheadAttention`` calls ``F.linear`` with ``out_proj.weight``: its submodule
    would be a tracked layer that never receives statistics. It is untracked, with the
    reason in describe(); the encoder layer's feed-forward Linears are preconditioned."""
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True).double()
    with pytest.warns(UserWarning, match=r"'self_attn' \(MultiheadAttention\), "
                                         r"'self_attn.out_proj'.*get no Kronecker block"):
        opt = tekfac.TEKFAC(block, fisher="empirical", cov_update_freq=1, eigen_update_freq=1,
                            scale_update_freq=1)
    assert [la.name for la in opt.preconditioner.layers] == ["linear1", "linear2"]
    rows = {line.split()[0]: line for line in opt.describe().splitlines()}
    assert "inside nn.MultiheadAttention, which calls F.linear" in rows["self_attn.out_proj"]
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    out = block(x)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    opt.step()
    for layer in opt.preconditioner.layers:  # every tracked layer got statistics
        assert opt.curvature(layer.module).dense().isfinite().all()


def test_a_parameter_shared_by_two_tracked_layers_is_refused():
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    net[2].weight = net[0].weight
    with pytest.raises(ValueError, match=r"'0' and '2' share a parameter.*exclude=\['2'\]"):
        tekfac.KFAC(net)
    assert [la.name for la in tekfac.KFAC(net, exclude=["2"]).preconditioner.layers] == ["0"]


class TiedLM(nn.Module):
    """Token embedding and an output layer that share one weight (nanoGPT's weight tying)."""

    def __init__(self, vocab: int = 7, width: int = 4, tied: bool = True):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.wte(tokens))))


def test_a_weight_tied_to_an_embedding_is_preconditioned_by_the_output_layer_alone():
    """The tied weight's block is the output layer's use (the embedding is untracked): it
    equals the block of an untied twin with the same values, and describe() says so."""
    torch.manual_seed(0)
    tied = TiedLM().double()
    untied = TiedLM(tied=False).double()
    untied.load_state_dict(tied.state_dict())
    tokens = torch.randint(0, 7, (6, 5))
    opts = []
    for model in (tied, untied):
        opt = tekfac.KFAC(model, fisher="empirical", cov_update_freq=1, eigen_update_freq=1)
        logits = model(tokens)
        F.cross_entropy(logits.view(-1, 7), tokens.view(-1)).backward()
        opt.step()
        opts.append(opt)
    torch.testing.assert_close(opts[0].curvature(tied.head).dense(),
                               opts[1].curvature(untied.head).dense())
    assert "shares parameters with 'wte'" in opts[0].describe()
    assert "shares" not in opts[1].describe()
