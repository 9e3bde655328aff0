"""Faults, mixed precision, accumulation, weight sharing and resume (robustness)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
import tekfac.chunks
from tekfac import linalg
from tests.conftest import batch, tiny_net, train
from tests.reference import layer_references

EVERY = dict(cov_update_freq=1, eigen_update_freq=1, scale_update_freq=1)


def step(model, opt, x, y, mc=True):
    train(model, opt, [(x, y)], mc)


def snapshot(opt):
    return copy.deepcopy(opt.preconditioner.state_dict()["layers"])


# ------------------------------------------------------------------------- non-finite values
def test_non_finite_batch_is_skipped_and_training_continues(method):
    net, shape = tiny_net("cnn")
    opt = tekfac.KroneckerOptimizer(net, method, fisher="empirical", **EVERY)
    step(net, opt, *batch(shape), mc=False)
    params = [p.detach().clone() for p in net.parameters()]
    state = snapshot(opt)
    x, y = batch(shape)
    x[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning) as record:
        step(net, opt, x, y, mc=False)
    messages = " ".join(str(w.message) for w in record)
    assert "non-finite gradient; skipping this step" in messages
    assert opt.preconditioner.steps == 1  # the whole step is skipped, statistics too
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    for name, layer_state in snapshot(opt).items():
        for key, value in layer_state.items():
            assert torch.equal(value, state[name][key]), (name, key)
    with warnings.catch_warnings():  # a good batch: no warning, a normal step
        warnings.simplefilter("error")
        step(net, opt, *batch(shape), mc=False)
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("method", ["kfac", "tekfac"])
def test_only_the_layer_with_non_finite_statistics_is_skipped(method, monkeypatch):
    """NaN in the first layer's factors only (the gradients are finite): that layer keeps
    its state, the second layer's statistics are still folded in, and the step is taken."""
    net, shape = tiny_net("mlp")
    opt = tekfac.KroneckerOptimizer(net, method, fisher="empirical", **EVERY)
    step(net, opt, *batch(shape), mc=False)
    state = snapshot(opt)
    kind = opt.preconditioner.factor_kind
    factors = kind.factors

    def poisoned(ex):
        factor_in, factor_out = factors(ex)
        return (factor_in * float("nan"), factor_out) if ex.layer.name == "0" else (
            factor_in, factor_out)

    monkeypatch.setattr(kind, "factors", poisoned)
    with pytest.warns(RuntimeWarning) as record:
        step(net, opt, *batch(shape), mc=False)
    messages = " ".join(str(w.message) for w in record)
    assert "layer '0': non-finite statistics" in messages and "layer '2'" not in messages
    assert opt.preconditioner.steps == 2
    after = snapshot(opt)
    for key, value in after["0"].items():
        assert torch.equal(value, state["0"][key]), key
    assert not torch.equal(after["2"]["factor_in"], state["2"]["factor_in"])
    assert all(torch.isfinite(v).all() for v in after["2"].values())


def test_a_non_finite_output_gradient_skips_the_whole_step():
    """NaN in the first layer's output gradient reaches its weight gradient: the step is
    skipped whole, every layer keeps its state and the step counter stays."""
    net, shape = tiny_net("mlp")
    poison = {"on": False}

    def nan_gradient(module, args, output):
        output.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan"))
                             if poison["on"] else g)

    net[0].register_forward_hook(nan_gradient)  # before the optimizer's hook: it sees NaN
    opt = tekfac.KFAC(net, fisher="empirical", **EVERY)
    step(net, opt, *batch(shape), mc=False)
    state = snapshot(opt)
    poison["on"] = True
    with pytest.warns(RuntimeWarning, match="non-finite gradient; skipping this step"):
        step(net, opt, *batch(shape), mc=False)
    assert opt.preconditioner.steps == 1
    for name, layer_state in snapshot(opt).items():
        for key, value in layer_state.items():
            assert torch.equal(value, state[name][key]), (name, key)


def test_warnings_are_given_once():
    net, shape = tiny_net("mlp")
    opt = tekfac.KFAC(net, fisher="empirical", **EVERY)
    x, y = batch(shape)
    x[:] = float("inf")
    with pytest.warns(RuntimeWarning):
        step(net, opt, x, y, mc=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(net, opt, x, y, mc=False)  # the same problems again: silent


# ------------------------------------------------------------------------- eigendecomposition
def test_eigh_failure_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype != torch.float64:
            raise torch.linalg.LinAlgError("forced failure")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    m = torch.randn(6, 6)
    m = m @ m.T
    values, vectors = linalg.symmetric_eigh(m)
    assert calls == [torch.float32, torch.float64] and values.dtype == torch.float32
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m, rtol=1e-4,
                               atol=1e-4)


def test_eigh_failure_keeps_the_previous_basis(monkeypatch):
    net, shape = tiny_net("mlp")
    opt = tekfac.EKFAC(net, fisher="empirical", **EVERY)
    step(net, opt, *batch(shape), mc=False)
    before = snapshot(opt)

    def broken(m):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="eigendecomposition failed"):
        step(net, opt, *batch(shape), mc=False)
    after = snapshot(opt)
    for name in before:
        for key in ("basis_in", "basis_out", "eig_in", "eig_out"):
            assert torch.equal(after[name][key], before[name][key])
        assert not torch.equal(after[name]["factor_in"], before[name]["factor_in"])
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_near_singular_factors_give_a_finite_step():
    """Identical examples: rank-one factors, most eigenvalues 0, damping keeps it finite."""
    net, shape = tiny_net("cnn")
    opt = tekfac.TEKFAC(net, fisher="empirical", damping=1e-6, **EVERY)
    x = torch.randn(1, *shape, dtype=torch.float64).expand(16, *shape).contiguous()
    y = torch.zeros(16, dtype=torch.long)
    for _ in range(3):
        step(net, opt, x, y, mc=False)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_non_finite_factor_is_not_decomposed():
    m = torch.eye(3)
    m[0, 1] = float("nan")
    assert linalg.symmetric_eigh(m) is None


# ------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_keeps_float32_statistics(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = tekfac.KroneckerOptimizer(net, method, **EVERY)
    x, y = batch((1, 6, 6), dtype=torch.float32)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            loss = F.cross_entropy(out, y)
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    for state in opt.preconditioner.states.values():
        assert state.factor_in.dtype == state.scaling.dtype == torch.float32
        assert torch.isfinite(state.scaling).all()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_grad_scaler_statistics_are_unscaled(fisher):
    net, shape = tiny_net("cnn")
    twin = copy.deepcopy(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = tekfac.TEKFAC(net, fisher=fisher, grad_scaler=scaler, seed=3, **EVERY)
    plain = tekfac.TEKFAC(twin, fisher=fisher, seed=3, **EVERY)
    x, y = batch(shape)
    for model, opt, s in ((net, scaled, scaler), (twin, plain, None)):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        if fisher == "mc":
            opt.backward(s.scale(loss) if s else loss, out)
        else:
            (s.scale(loss) if s else loss).backward()
        if s:
            s.step(opt)
            s.update()
        else:
            opt.step()
    for a, b in zip(scaled.preconditioner.layers, plain.preconditioner.layers):
        torch.testing.assert_close(scaled.curvature(a.module).dense(),
                                   plain.curvature(b.module).dense(), rtol=1e-9, atol=1e-12)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gradient_accumulation_matches_the_full_batch(kind, method):
    net, shape = tiny_net(kind)
    twin = copy.deepcopy(net)
    full = tekfac.KroneckerOptimizer(net, method, fisher="empirical", **EVERY)
    micro = tekfac.KroneckerOptimizer(twin, method, fisher="empirical", **EVERY)
    x, y = batch(shape, n=12)
    full.zero_grad()
    F.cross_entropy(net(x), y).backward()
    full.step()
    micro.zero_grad()
    for part in range(3):
        sl = slice(4 * part, 4 * part + 4)
        (F.cross_entropy(twin(x[sl]), y[sl]) / 3).backward()
    micro.step()
    for a, b in zip(full.preconditioner.layers, micro.preconditioner.layers):
        torch.testing.assert_close(full.curvature(a.module).dense(),
                                   micro.curvature(b.module).dense(), rtol=1e-9, atol=1e-12)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_mc_accumulation_combines_the_micro_batch_statistics(method, argmax_sampler):
    """MC statistics are computed and reduced per micro-batch inside backward(); combined by
    their counts they equal the full batch's, also for the corrected scaling estimated early
    (step 1: the basis of step 0 is kept). Deterministic labels make the two runs comparable;
    24 examples make the factors full rank, so that their eigenbases are unique and the
    corrected scalings agree up to the roundoff rotation ~ε/gap of the basis."""
    net, shape = tiny_net("cnn")
    twin = copy.deepcopy(net)
    freqs = dict(cov_update_freq=1, eigen_update_freq=2, scale_update_freq=1)
    full = tekfac.KroneckerOptimizer(net, method, **freqs)
    micro = tekfac.KroneckerOptimizer(twin, method, **freqs)
    for x, y in (batch(shape, n=24) for _ in range(2)):
        out = net(x)
        full.zero_grad()
        full.backward(F.cross_entropy(out, y), out)
        full.step()
        micro.zero_grad()
        for part in (slice(0, 5), slice(5, 24)):  # unequal micro-batches
            out = twin(x[part])
            micro.backward(F.cross_entropy(out, y[part]) * (out.shape[0] / 24), out)
        micro.step()
    for a, b in zip(full.preconditioner.layers, micro.preconditioner.layers):
        dense, ref = micro.curvature(b.module).dense(), full.curvature(a.module).dense()
        assert (dense - ref).norm() <= 1e-8 * ref.norm()
    for p, q in zip(twin.parameters(), net.parameters()):
        assert (p - q).norm() <= 1e-8 * q.norm()
    assert argmax_sampler


def test_mc_accumulation_counts_every_micro_batch():
    net, shape = tiny_net("mlp")
    opt = tekfac.KFAC(net, **EVERY)
    x, y = batch(shape, n=12)
    opt.zero_grad()
    for part in range(3):
        sl = slice(4 * part, 4 * part + 4)
        out = net(x[sl])
        opt.backward(F.cross_entropy(out, y[sl]) / 3, out)
    collected = opt.preconditioner._collect()
    assert [b.num_examples for b in collected.values()] == [12, 12]
    examples = collected[opt.preconditioner.layers[0]].examples(torch.float64)
    assert [(ex.inputs[0].shape, ex.g.shape) for ex in examples] == [((4, 5), (4, 1, 4))] * 3
    opt.step()


# ------------------------------------------------------------------------- weight sharing
class SharedNet(nn.Module):
    """The same Linear applied twice in one forward (recurrent-style weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h)


@pytest.mark.parametrize("method_", ["ekfac", "tekfac", "tkfac"])
def test_weight_sharing_is_kfac_expand(method_):
    torch.manual_seed(0)
    net = SharedNet().double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    # per-example gradients of the shared layer (summed over its two calls) via torch.func
    names = dict(net.named_parameters())
    per_example = torch.func.vmap(torch.func.grad(
        lambda p, xi, yi: F.cross_entropy(torch.func.functional_call(net, p, (xi[None],)),
                                          yi[None])), in_dims=(None, 0, 0))(
        {k: v.detach() for k, v in names.items()}, x, y)
    d = torch.cat([per_example["shared.weight"], per_example["shared.bias"][..., None]], dim=2)
    fisher = d.flatten(1).T @ d.flatten(1) / len(d)
    pre = tekfac.Preconditioner(net, method_, fisher="empirical", **EVERY)
    F.cross_entropy(net(x), y).backward()
    pre.update_curvature()
    curv = pre.curvature(net.shared)
    torch.testing.assert_close(curv.trace(), fisher.trace(), rtol=1e-9, atol=1e-12)
    if method_ != "tkfac":
        u_out, u_in = curv.eigenbasis()
        q = torch.kron(u_out, u_in)
        torch.testing.assert_close(curv.scaling().reshape(-1), torch.diagonal(q.T @ fisher @ q),
                                   rtol=1e-8, atol=1e-10)


def test_repeated_calls_with_different_batch_sizes_are_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x).sum() + self.lin(x[:2]).sum()

    net = Odd().double()
    opt = tekfac.KFAC(net, fisher="empirical")
    net(torch.randn(4, 3, dtype=torch.float64)).backward()
    with pytest.raises(RuntimeError, match="different sizes"):
        opt.step()


# ------------------------------------------------------------------------- odd models
def test_frozen_unused_and_varying_batches():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)
            self.frozen = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.b(torch.tanh(self.frozen(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    net = Branchy().double()
    opt = tekfac.TEKFAC(net, cov_update_freq=2, eigen_update_freq=3, scale_update_freq=2)
    assert [la.name for la in opt.preconditioner.layers] == ["a", "b", "unused"]
    frozen = copy.deepcopy(net.frozen.state_dict())
    for n in (8, 5, 1, 7, 3, 8):
        step(net, opt, *batch((5,), n=n))
    net.a.requires_grad_(False)  # frozen after construction: no gradient, no update
    a_before = net.a.weight.detach().clone()
    step(net, opt, *batch((5,), n=4))
    assert torch.equal(net.a.weight, a_before)
    assert all(torch.equal(v, net.frozen.state_dict()[k]) for k, v in frozen.items())
    assert opt.preconditioner.states[opt.preconditioner.layers[2]].factor_in is None
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------- resume
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_resume_with_scheduler_is_bit_identical_for_50_steps(kind, tmp_path):
    def build():
        torch.manual_seed(0)
        net, _ = tiny_net(kind)
        opt = tekfac.TEKFAC(net, lr=0.05, cov_update_freq=3, eigen_update_freq=7,
                            scale_update_freq=2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=80)
        return net, opt, sched

    shape = tiny_net(kind)[1]
    data = [batch(shape) for _ in range(60)]
    net, opt, sched = build()

    def train(n, o, s, batches):
        for x, y in batches:
            step(n, o, x, y)
            s.step()

    train(net, opt, sched, data[:10])
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    train(net, opt, sched, data[10:])
    net2, opt2, sched2 = build()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train(net2, opt2, sched2, data[10:])
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_failed_load_leaves_the_optimizer_unchanged():
    net, shape = tiny_net("mlp")
    opt = tekfac.KFAC(net, fisher="empirical")
    step(net, opt, *batch(shape), mc=False)
    before = snapshot(opt)
    bad = opt.state_dict()
    bad["param_groups"] = []
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    for name, layer_state in snapshot(opt).items():
        for key, value in layer_state.items():
            assert torch.equal(value, before[name][key])


def test_reference_and_shared_layers_agree_without_sharing():
    """The accumulation-aware capture is exact for a plain network too."""
    net, shape = tiny_net("conv1d")
    x, y = batch(shape)
    refs = layer_references(net, x, y)
    pre = tekfac.Preconditioner(net, "kfac", fisher="empirical", **EVERY)
    F.cross_entropy(net(x), y).backward()
    pre.update_curvature()
    for module, ref in refs.items():
        torch.testing.assert_close(pre.curvature(module).dense(), ref.kfac_dense(),
                                   rtol=1e-8, atol=1e-10)


def test_chunked_statistics_equal_whole_batch_statistics(method, monkeypatch):
    """Patches and per-example gradients are processed in chunks; the result must not
    depend on the chunk size (here: one example per chunk)."""
    net, shape = tiny_net("cnn")
    twin = copy.deepcopy(net)
    x, y = batch(shape, n=6)
    results = []
    for model, chunk in ((net, 1 << 22), (twin, 1)):
        monkeypatch.setattr(tekfac.chunks, "CHUNK_ELEMENTS", chunk)
        assert len(tekfac.chunks.example_ranges(2, 1 << 21)) == (2 if chunk == 1 else 1)
        pre = tekfac.Preconditioner(model, method, fisher="empirical", **EVERY)
        F.cross_entropy(model(x), y).backward()
        pre.update_curvature()
        results.append([pre.curvature(la.module).dense() for la in pre.layers])
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------- unbatched inputs
UNBATCHED = {  # a network of each layer kind and the shape of one unbatched example
    "linear": (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), (4,)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(),
                                     nn.Conv1d(3, 2, 2, stride=2)), (2, 7)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                                     nn.Conv2d(3, 2, 2)), (2, 5, 4)),
}


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("kind", list(UNBATCHED))
def test_an_unbatched_input_is_one_example(kind, fisher, method):
    """PyTorch layers accept one example without its batch dimension (``(d,)``, ``(C, L)``,
    ``(C, H, W)``); its curvature and step equal those of the same example as a batch of
    one."""
    build, shape = UNBATCHED[kind]
    torch.manual_seed(0)
    net = build().double()
    twin = copy.deepcopy(net)
    x = torch.randn(shape, dtype=torch.float64)
    opts = []
    for model, inputs in ((net, x[None]), (twin, x)):
        opt = tekfac.KroneckerOptimizer(model, method, fisher=fisher, loss="mse", seed=0,
                                        **EVERY)
        for _ in range(2):
            out = model(inputs)
            loss = F.mse_loss(out, torch.zeros_like(out))
            opt.zero_grad()
            opt.backward(loss, out)
            opt.step()
        opts.append(opt)
    for a, b in zip(net.modules(), twin.modules()):
        if isinstance(a, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            torch.testing.assert_close(opts[1].curvature(b).dense(), opts[0].curvature(a).dense())
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p)
