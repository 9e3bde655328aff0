"""docs/design.md §2–§3 properties of all four methods against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
from tests.conftest import NETS, set_fields, tiny_net
from tests.reference import LOSSES, layer_references

TOL = dict(rtol=1e-8, atol=1e-10)
EVERY_STEP = dict(fisher="empirical", cov_update_freq=1, eigen_update_freq=1,
                  scale_update_freq=1, stat_decay=0.0)


def fitted(kind: str, method: str, n: int = 8, **options):
    """A preconditioner after one statistics step on a random batch, and the references."""
    net, shape = tiny_net(kind)
    x = torch.randn(n, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    refs = layer_references(net, x, y)
    pre = tekfac.Preconditioner(net, method, **{**EVERY_STEP, **options})
    F.cross_entropy(net(x), y).backward()
    pre.update_curvature()
    pre.remove_hooks()
    return pre, refs


def rotation(curv: tekfac.Curvature) -> torch.Tensor:
    u_out, u_in = curv.eigenbasis()
    return torch.kron(u_out, u_in)


def frobenius_optimal(fisher: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Q diag(diag(Q^T F Q)) Q^T``: the best approximation of F diagonal in basis Q."""
    return (q * torch.diagonal(q.T @ fisher @ q)) @ q.T


@pytest.mark.parametrize("kind", NETS)
def test_dense_equals_its_formula(kind, method):
    pre, refs = fitted(kind, method)
    assert len(refs) == len(pre.layers)
    for module, ref in refs.items():
        curv = pre.curvature(module)
        q = rotation(curv)
        if method == "kfac":
            expected = ref.kfac_dense()
        elif method == "tkfac":
            expected = ref.tkfac_dense()
        else:
            expected = frobenius_optimal(ref.fisher, q)
            basis_source = ref.kfac_dense() if method == "ekfac" else ref.tkfac_dense()
            rotated = q.T @ basis_source @ q  # the basis diagonalises the Kronecker factors
            torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), **TOL)
        torch.testing.assert_close(curv.dense(), expected, **TOL)
        torch.testing.assert_close(q.T @ q, torch.eye(len(q), dtype=q.dtype), **TOL)


@pytest.mark.parametrize("kind", NETS)
def test_trace_is_preserved(kind, method):
    pre, refs = fitted(kind, method)
    for module, ref in refs.items():
        curv = pre.curvature(module)
        exact = ref.fisher.trace()
        torch.testing.assert_close(curv.trace(), curv.dense().trace(), **TOL)
        if method == "kfac":
            continue  # KFAC keeps the trace only when T = 1 and N = 1
        torch.testing.assert_close(curv.trace(), exact, **TOL)


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("method_", ["ekfac", "tekfac"])
def test_corrected_scaling_is_diagonal_of_fisher_in_basis(kind, method_):
    pre, refs = fitted(kind, method_)
    for module, ref in refs.items():
        curv = pre.curvature(module)
        q = rotation(curv)
        torch.testing.assert_close(curv.scaling().reshape(-1), torch.diagonal(q.T @ ref.fisher @ q),
                                   **TOL)


@pytest.mark.parametrize("kind", NETS)
def test_tekfac_skips_delta_which_its_corrected_scaling_replaces(kind, monkeypatch):
    """δ only scales TKFAC's Kronecker eigenvalues; TEKFAC re-fits them, so it never computes
    the per-example norms δ needs (and keeps ``scale = 1``), while TKFAC's δ is ``tr F``."""
    calls = []
    norms = tekfac.factors.example_sq_norms
    monkeypatch.setattr(tekfac.factors, "example_sq_norms",
                        lambda ex: calls.append(1) or norms(ex))
    pre, refs = fitted(kind, "tekfac")
    assert not calls
    assert all(float(pre.states[la].scale) == 1.0 for la in pre.layers)
    pre, refs = fitted(kind, "tkfac")
    assert calls
    for layer, ref in zip(pre.layers, refs.values()):
        torch.testing.assert_close(pre.states[layer].scale, ref.fisher.trace(), **TOL)


def test_single_example_is_exact(method):
    pre, refs = fitted("mlp", method, n=1)
    for module, ref in refs.items():
        torch.testing.assert_close(pre.curvature(module).dense(), ref.fisher, **TOL)


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize(("corrected", "plain"), [("ekfac", "kfac"), ("tekfac", "tkfac")])
def test_correction_lowers_frobenius_error(kind, corrected, plain):
    better, refs = fitted(kind, corrected)
    torch.manual_seed(0)  # the same batch and weights again
    worse, _ = fitted(kind, plain)
    for (module, ref), other in zip(refs.items(), worse.layers):
        err_corrected = (better.curvature(module).dense() - ref.fisher).norm()
        err_plain = (worse.curvature(other.module).dense() - ref.fisher).norm()
        assert err_corrected <= err_plain * (1 + 1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_eigenvalue_damping_is_tikhonov_inverse(kind, method, damping):
    pre, _ = fitted(kind, method, damping=damping)
    for layer in pre.layers:
        curv = pre.curvature(layer.module)
        dense = curv.dense()
        eye = torch.eye(len(dense), dtype=dense.dtype)
        torch.testing.assert_close(curv.dense(damped=True), dense + damping * eye, **TOL)
        m = torch.randn(layer.d_out, layer.d_in, dtype=torch.float64)
        expected = torch.linalg.solve(dense + damping * eye, m.reshape(-1)).reshape(m.shape)
        torch.testing.assert_close(curv.precondition(m), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method_", ["kfac", "tkfac"])
def test_pi_damping_formula(kind, method_):
    damping = 0.01
    pre, refs = fitted(kind, method_, damping=damping, damping_type="pi")
    for module, ref in refs.items():
        if method_ == "kfac":
            a, g = ref.kfac_factors()
        else:
            phi, psi, delta = ref.trace_restricted_factors()
            a, g = delta.sqrt() * phi, delta.sqrt() * psi
        pi = math.sqrt((a.trace() / len(a)) / (g.trace() / len(g)))
        expected = torch.kron(g + math.sqrt(damping) / pi * torch.eye(len(g), dtype=g.dtype),
                              a + pi * math.sqrt(damping) * torch.eye(len(a), dtype=a.dtype))
        curv = pre.curvature(module)
        torch.testing.assert_close(curv.dense(damped=True), expected, **TOL)
        m = torch.randn(g.shape[0], a.shape[0], dtype=torch.float64)
        solved = torch.linalg.solve(expected, m.reshape(-1)).reshape(m.shape)
        torch.testing.assert_close(curv.precondition(m), solved, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_trace_relative_damping_formula(kind, method):
    gamma, floor = 0.05, 1e-6
    pre, _ = fitted(kind, method, damping=gamma, damping_type="trace_relative",
                    damping_floor=floor)
    for layer in pre.layers:
        curv = pre.curvature(layer.module)
        dense = curv.dense()
        lam = max(gamma * dense.trace().item() / len(dense), floor)
        eye = torch.eye(len(dense), dtype=dense.dtype)
        torch.testing.assert_close(curv.dense(damped=True), dense + lam * eye, **TOL)


def test_trace_relative_damping_floor():
    pre, _ = fitted("mlp", "kfac", damping=1e-3, damping_type="trace_relative",
                    damping_floor=10.0)
    curv = pre.curvature(pre.layers[0].module)
    dense = curv.dense()
    torch.testing.assert_close(curv.dense(damped=True),
                               dense + 10.0 * torch.eye(len(dense), dtype=dense.dtype), **TOL)


def test_pi_damping_refused_for_corrected_scaling():
    net, _ = tiny_net("mlp")
    with pytest.raises(ValueError, match="pi"):
        tekfac.EKFAC(net, damping_type="pi")


def test_step_rewrites_gradients_with_the_damped_inverse(method):
    net, shape = tiny_net("cnn")
    x = torch.randn(8, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    pre = tekfac.Preconditioner(net, method, **EVERY_STEP, damping=0.3)
    F.cross_entropy(net(x), y).backward()
    raw = {la: la.gradient_matrix().clone() for la in pre.layers}
    pre.step()
    for layer in pre.layers:
        dense = pre.curvature(layer.module).dense(damped=True)
        expected = torch.linalg.solve(dense, raw[layer].reshape(-1)).reshape(raw[layer].shape)
        torch.testing.assert_close(layer.gradient_matrix(), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("loss", "make_target"), [
    ("cross_entropy", lambda out: torch.zeros(len(out), dtype=torch.long)),
    ("mse", lambda out: torch.zeros_like(out)),
    ("bce_with_logits", lambda out: torch.zeros_like(out)),
])
def test_mc_fisher_converges_to_true_fisher(loss, make_target):
    """Many copies of one input in one batch: KFAC's factors are then exact up to MC noise.

    For one distinct input ``A`` is exactly ``a a^T`` and ``E_y[G]`` is the true Fisher's
    output factor, so the curvature ``c·G ⊗ A`` converges to ``J^T H J``, H the Hessian of the
    per-example loss in output space (the loss's Fisher; ``c = 3`` for the losses averaged
    over the 3 outputs, docs/design.md §3). 40,000 samples give a relative Frobenius error of
    about 1/sqrt(40000)·O(1); we allow 5 %.
    """
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    n = 40_000
    batch = x.expand(n, 3)
    pre = tekfac.Preconditioner(net, "kfac", fisher="mc", loss=loss, seed=1,
                                cov_update_freq=1, eigen_update_freq=1, stat_decay=0.0)
    out = net(batch)
    pre.backward(LOSSES[loss](out, make_target(out)), out)
    pre.update_curvature()
    # exact true Fisher of the single example, from the Jacobian of the outputs
    pre.remove_hooks()
    params = {k: v.detach() for k, v in net.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x,))[0])(params)
    with torch.no_grad():
        f = net(x)[0]
    if loss == "cross_entropy":
        p = torch.softmax(f, 0)
        h = torch.diag(p) - torch.outer(p, p)
    elif loss == "mse":  # l = (1/3)Σ(f-y)²: Hessian (2/3)·I
        h = torch.eye(3, dtype=f.dtype) * 2 / 3
    else:  # mean over 3 outputs of BCE: Hessian diag(σ(1 - σ))/3
        s = torch.sigmoid(f)
        h = torch.diag(s * (1 - s)) / 3
    for layer in pre.layers:
        name = layer.name
        jw, jb = jac[f"{name}.weight"], jac[f"{name}.bias"]  # (3, d_out, d_in), (3, d_out)
        j = torch.cat([jw, jb[..., None]], dim=2).flatten(1)  # row-major [W | b]
        exact = j.T @ h @ j
        approx = pre.curvature(layer.module).dense()
        rel = (approx - exact).norm() / exact.norm()
        assert rel < 0.05, f"{loss} {name}: relative error {rel:.3f}"


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_statistics_are_a_bias_corrected_average(method):
    """docs/design.md §4.1: after ``n`` updates with ``β = stat_decay`` a factor (and a
    re-fitted scaling) is ``Σ_k β^k X_{n-k} / Σ_k β^k`` of the batch estimates: the second
    update weighs the new batch by ``1/(1 + β)``, not by ``1 − β`` (which left the first batch
    dominant for tens of steps). Checked against the dense references of every batch."""
    beta = 0.9
    net, shape = tiny_net("mlp")
    batches = [(torch.randn(8, *shape, dtype=torch.float64), torch.randint(0, 3, (8,)))
               for _ in range(4)]
    refs = [layer_references(net, x, y) for x, y in batches]  # the parameters stay fixed
    pre = tekfac.Preconditioner(net, method, **{**EVERY_STEP, "stat_decay": beta,
                                                "eigen_update_freq": 10**6})
    for x, y in batches:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        pre.update_curvature()
    weights = torch.tensor([beta**k for k in range(3, -1, -1)], dtype=torch.float64)
    weights /= weights.sum()
    for layer in pre.layers:
        state, module = pre.states[layer], layer.module
        expected_a = sum(w * r[module].kfac_factors()[0] for w, r in zip(weights, refs))
        expected_g = sum(w * r[module].kfac_factors()[1] for w, r in zip(weights, refs))
        torch.testing.assert_close(state.factor_in, expected_a, **TOL)
        torch.testing.assert_close(state.factor_out, expected_g, **TOL)
        assert float(state.factor_weight) == pytest.approx(sum(beta**k for k in range(4)))
        if method == "ekfac":  # one basis (the first batch's) throughout: S averages alike
            q = rotation(pre.curvature(module))
            expected_s = sum(w * torch.diagonal(q.T @ r[module].fisher @ q)
                             for w, r in zip(weights, refs))
            torch.testing.assert_close(state.scaling.reshape(-1), expected_s, **TOL)


def test_a_state_saved_without_weights_continues_the_plain_ema():
    """A checkpoint from before the weights were kept has no ``factor_weight``: it is taken
    as converged, ``1/(1 − β)``, so the next update is ``β X + (1 − β) X_batch`` as then."""
    beta = 0.9
    net, shape = tiny_net("mlp")
    batches = [(torch.randn(8, *shape, dtype=torch.float64), torch.randint(0, 3, (8,)))
               for _ in range(2)]
    ref = layer_references(net, *batches[1])
    pre = tekfac.Preconditioner(net, "kfac", **{**EVERY_STEP, "stat_decay": beta})
    for x, y in batches[:1]:
        F.cross_entropy(net(x), y).backward()
        pre.update_curvature()
    saved = pre.state_dict()
    saved["layers"] = {name: {k: entry[k] for k in set_fields(entry) - {"factor_weight"}}
                       for name, entry in saved["layers"].items()}  # format 2's set fields
    pre.load_state_dict(saved)
    old = {la: pre.states[la].factor_in.clone() for la in pre.layers}
    x, y = batches[1]
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    pre.update_curvature()
    for layer in pre.layers:
        expected = beta * old[layer] + (1 - beta) * ref[layer.module].kfac_factors()[0]
        torch.testing.assert_close(pre.states[layer].factor_in, expected, **TOL)
