"""The quadratic-model step rule (docs/design.md §4.7) against exact linear algebra: the
curvature–vector products against the dense Gauss–Newton matrix of the loss (``torch.func``),
the rate and momentum against the closed-form 2 × 2 solution, the Levenberg–Marquardt ratio
on an exactly quadratic loss, param groups, checkpoints and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import tekfac
from tekfac.damping_adaptation import DampingAdaptation
from tekfac.quadratic import curvature_gram, solve

FAST = dict(cov_update_freq=1, eigen_update_freq=1, scale_update_freq=1)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def dense_gauss_newton(model, x, loss_of_outputs, view=lambda f: f) -> torch.Tensor:
    """``Jᵀ H J`` with ``J`` the Jacobian of ``view(model(x))`` in the flat parameters and
    ``H`` the Hessian of ``loss_of_outputs`` in those outputs (both by ``torch.func``)."""
    def outputs(flat):
        return view(functional_call(model, _unflat(model, flat), (x,)))

    theta = _flat(model)
    f = outputs(theta).detach()
    jac = jacrev(outputs)(theta).reshape(f.numel(), -1)
    h = hessian(lambda o: loss_of_outputs(o.reshape(f.shape)))(f.reshape(-1))
    return jac.T @ h @ jac


def _vectors(model, count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
            for _ in range(count)]


def _stacked(vectors):
    return torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors])


def _mlp(d_in=5, d_out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out)).double()


CASES = {
    # name: (loss, reduction, output width, targets, outputs view, loss of the viewed outputs)
    "cross_entropy-mean": ("cross_entropy", "mean", 3, lambda g: torch.randint(0, 3, (6,),
                                                                                 generator=g)),
    "cross_entropy-sum": ("cross_entropy", "sum", 3, lambda g: torch.randint(0, 3, (6,),
                                                                               generator=g)),
    "mse-mean": ("mse", "mean", 3, lambda g: torch.randn(6, 3, generator=g,
                                                          dtype=torch.float64)),
    "mse-sum": ("mse", "sum", 3, lambda g: torch.randn(6, 3, generator=g, dtype=torch.float64)),
    "bce_with_logits-mean": ("bce_with_logits", "mean", 3,
                             lambda g: torch.rand(6, 3, generator=g, dtype=torch.float64)),
}
LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss,
          "bce_with_logits": F.binary_cross_entropy_with_logits}


@pytest.mark.parametrize("case", sorted(CASES))
def test_curvature_products_equal_the_dense_gauss_newton(case):
    loss, reduction, width, targets = CASES[case]
    model = _mlp(d_out=width)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=gen, dtype=torch.float64), targets(gen)
    exact = dense_gauss_newton(model, x, lambda f: LOSSES[loss](f, y, reduction=reduction))
    vectors = _vectors(model, 2)
    got = curvature_gram(loss, reduction, [(model(x), None)], list(model.parameters()), vectors)
    v = _stacked(vectors)
    torch.testing.assert_close(got, v @ exact @ v.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["flattened", "class-axis-1"])
def test_sequence_logits_in_either_layout(layout):
    """Logits ``(N, T, V)`` given as ``logits.view(-1, V)`` or ``logits.transpose(1, 2)``:
    the mean runs over the ``N·T`` positions either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64), torch.randint(0, 5, (2, 3),
                                                                                    generator=gen)
    if layout == "flattened":
        view, target = (lambda f: f.reshape(-1, 5)), y.reshape(-1)
    else:
        view, target = (lambda f: f.transpose(1, 2)), y
    exact = dense_gauss_newton(model, x, lambda f: F.cross_entropy(f, target), view)
    vectors = _vectors(model, 2)
    got = curvature_gram("cross_entropy", "mean", [(view(model(x)), None)],
                         list(model.parameters()), vectors)
    v = _stacked(vectors)
    torch.testing.assert_close(got, v @ exact @ v.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_masked_terms_leave_the_curvature(loss):
    """Positions outside the mask (``ignore_index``) add no curvature, and the mean runs over
    the kept ones: the dense Gauss–Newton matrix of the loss with ``ignore_index=-100`` (or,
    for MSE, of the mean over the kept entries)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, True]]).reshape(-1)
    if loss == "cross_entropy":
        labels = torch.randint(0, 5, (8,), generator=gen).masked_fill(~mask, -100)
        reduced = lambda f: F.cross_entropy(f, labels)  # noqa: E731
    else:
        mask = mask[:, None].expand(8, 5).clone()
        mask[0, 1:3] = False
        y = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        reduced = lambda f: ((f - y).square() * mask).sum() / mask.sum()  # noqa: E731
    view = lambda f: f.reshape(-1, 5)  # noqa: E731
    exact = dense_gauss_newton(model, x, reduced, view)
    vectors = _vectors(model, 2)
    got = curvature_gram(loss, "mean", [(view(model(x)), mask)], list(model.parameters()),
                         vectors)
    v = _stacked(vectors)
    torch.testing.assert_close(got, v @ exact @ v.T, rtol=1e-10, atol=1e-12)
    unmasked = curvature_gram(loss, "mean", [(view(model(x)), None)],
                              list(model.parameters()), vectors)
    assert not torch.allclose(unmasked, got, rtol=1e-3)


def test_log_probabilities_have_the_fisher_of_their_logits():
    """For a model that ends in ``log_softmax`` (``"nll"``) the curvature is the Fisher of the
    categorical, the Gauss–Newton matrix of the same model's logits under cross-entropy (the
    Hessian of the NLL in its log-probabilities is zero)."""
    logits_model = _mlp()
    model = nn.Sequential(logits_model, nn.LogSoftmax(dim=1))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,),
                                                                                 generator=gen)
    exact = dense_gauss_newton(logits_model, x, lambda f: F.cross_entropy(f, y))
    vectors = _vectors(model, 2)
    got = curvature_gram("nll", "mean", [(model(x), None)], list(model.parameters()), vectors)
    v = _stacked(vectors)
    torch.testing.assert_close(got, v @ exact @ v.T, rtol=1e-10, atol=1e-12)


def test_micro_batches_average_to_the_whole_batch():
    model = _mlp()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    vectors, params = _vectors(model, 2), list(model.parameters())
    whole = curvature_gram("cross_entropy", "mean", [(model(x), None)], params, vectors)
    halves_of = [(model(x[:3]), None), (model(x[3:]), None)]
    halves = curvature_gram("cross_entropy", "mean", halves_of, params, vectors)
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=0)
    summed = curvature_gram("cross_entropy", "sum", halves_of, params, vectors)
    torch.testing.assert_close(summed, 6 * whole, rtol=1e-12, atol=0)


def test_solve_is_the_closed_form_and_drops_a_vector_that_adds_nothing():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -0.3], dtype=torch.float64)
    det = 2.0 * 1.0 - 0.25
    expected = torch.tensor([(1.0 * 1.0 - 0.5 * -0.3) / det, (2.0 * -0.3 - 0.5 * 1.0) / det],
                            dtype=torch.float64)
    torch.testing.assert_close(solve(a, b), expected, rtol=1e-14, atol=0)
    parallel = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # v₂ = 2 v₁
    assert solve(parallel, torch.tensor([1.0, 2.0], dtype=torch.float64)).tolist() == [1.0, 0.0]
    zero = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert solve(zero, torch.tensor([3.0, 0.0], dtype=torch.float64)).tolist() == [3.0, 0.0]
    assert solve(torch.zeros(1, 1, dtype=torch.float64),
                 torch.zeros(1, dtype=torch.float64)).tolist() == [0.0]


def _model_with_norm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()


def _groups(model, decay):
    weights = [model[0].weight, model[3].weight]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    return [{"params": weights, "weight_decay": decay}, {"params": others, "weight_decay": 0.0}]


def _batches(count, n=8):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=gen)) for _ in range(count)]


def _step(model, opt, x, y):
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.backward(loss, out)
    opt.step()


@pytest.mark.parametrize("method", ["kfac", "tekfac"])
def test_steps_are_the_closed_form_minimisers_of_the_exact_model(method):
    """Two steps of the rule against the closed form: ``(A + R + Λ) w = b`` with ``A`` from the
    dense Gauss–Newton matrix, ``R`` the coupled decay, ``Λ = λ·I`` (eigenvalue damping; the
    untracked LayerNorm gets the same ``λ``), ``b`` the objective's gradient, along the
    preconditioned direction (taken from a twin optimizer at the same state with lr 1 and no
    momentum, which moves by exactly ``−v₁``) and the previous update; the step is
    ``−lr·(α v₁ + μ v₂)``."""
    lr, decay, damping = 0.5, 1e-2, 1e-2
    model, twin_model = _model_with_norm(), _model_with_norm()
    options = dict(FAST, damping=damping, seed=0)
    opt = tekfac.KroneckerOptimizer(model, method, params=_groups(model, decay), lr=lr,
                                    step_rule="quadratic", **options)
    twin = tekfac.KroneckerOptimizer(twin_model, method, params=_groups(twin_model, decay),
                                     lr=1.0, momentum=0.0, kl_clip=None, **options)
    is_decayed = torch.cat([torch.full((p.numel(),), float(any(p is w for w in
                                                               (model[0].weight,
                                                                model[3].weight))))
                            for p in model.parameters()]).double()
    for i, (x, y) in enumerate(_batches(2)):
        twin.load_state_dict(opt.state_dict())
        for group in twin.param_groups:
            group.update(lr=1.0, momentum=0.0)
        twin_model.load_state_dict(model.state_dict())
        theta = _flat(model)
        _step(twin_model, twin, x, y)
        v1 = theta - _flat(twin_model)
        vectors = [v1]
        if i:
            vectors.append(torch.cat([opt.state[p]["momentum_buffer"].reshape(-1)
                                      for p in model.parameters()]))
        v = torch.stack(vectors)

        def loss_at(flat, x=x, y=y):
            return F.cross_entropy(functional_call(model, _unflat(model, flat), (x,)), y)

        grad = torch.func.grad(loss_at)(theta) + decay * is_decayed * theta
        exact = dense_gauss_newton(model, x, lambda f, y=y: F.cross_entropy(f, y))
        system = v @ exact @ v.T + damping * v @ v.T + decay * (v * is_decayed) @ v.T
        w = torch.linalg.solve(system, v @ grad)
        _step(model, opt, x, y)
        expected = theta - lr * (w @ v)
        torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-12)
        assert opt.step_coefficients == pytest.approx(
            (float(w[0]), float(w[1]) if i else 0.0), rel=1e-8)
    assert opt.kl_factor is None


def test_reduction_ratio_is_one_on_an_exactly_quadratic_loss():
    """Least squares on a linear model: the loss is its own quadratic model with the exact
    curvature, so the Levenberg–Marquardt ratio of every step is 1 (the approximation's model,
    with the fixed rule, is not)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randn(
        16, 3, generator=gen, dtype=torch.float64)
    ratios = {}
    for rule in ("quadratic", "fixed"):
        torch.manual_seed(0)
        model = nn.Linear(5, 3).double()
        opt = tekfac.KFAC(model, step_rule=rule, loss="mse", fisher="empirical", damping=1e-3,
                          damping_adaptive=DampingAdaptation(interval=1), **FAST)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            out = model(x)
            loss = F.mse_loss(out, y)
            opt.backward(loss, out)
            return loss

        ratios[rule] = []
        for _ in range(3):
            opt.step(closure)
            ratios[rule].append(opt.reduction_ratio)
    assert ratios["quadratic"] == pytest.approx([1.0] * 3, abs=1e-9)
    assert all(abs(r - 1) > 1e-3 for r in ratios["fixed"])


def test_resume_takes_identical_steps(tmp_path):
    def run(model, opt, batches):
        for x, y in batches:
            _step(model, opt, x, y)

    batches = _batches(6)
    model = _model_with_norm()
    opt = tekfac.TEKFAC(model, step_rule="quadratic", damping=1e-2, seed=0,
                        cov_update_freq=2, eigen_update_freq=3)
    run(model, opt, batches[:3])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    run(model, opt, batches[3:])
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = _model_with_norm()
    resumed.load_state_dict(saved["model"])
    again = tekfac.TEKFAC(resumed, step_rule="quadratic", damping=1e-2, seed=0,
                          cov_update_freq=2, eigen_update_freq=3)
    again.load_state_dict(saved["opt"])
    run(resumed, again, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert again.step_coefficients == opt.step_coefficients


def test_zero_grad_forgets_the_graphs_of_the_gradients_it_clears():
    """A backward whose step never came (``GradScaler`` skipped it) leaves no graph behind:
    the next step's model is that of its own batch."""
    (x0, y0), (x1, y1) = _batches(2, n=6)
    results = []
    for abandoned in (True, False):
        model = _mlp()
        opt = tekfac.KFAC(model, step_rule="quadratic", cov_update_freq=2, eigen_update_freq=2)
        _step(model, opt, x1, y1)
        if abandoned:  # step 1 collects no statistics: only the graph is left over
            out = model(x0)
            opt.backward(F.cross_entropy(out, y0), out)
        _step(model, opt, x1, y1)  # zero_grad first
        results.append(opt.step_coefficients)
    assert results[0] == results[1]


def test_without_momentum_only_the_rate_is_chosen():
    model = _mlp()
    opt = tekfac.KFAC(model, step_rule="quadratic", momentum=0.0, damping=1e-2, **FAST)
    for x, y in _batches(2, n=6):
        _step(model, opt, x, y)
        assert opt.step_coefficients[1] == 0.0 and opt.step_coefficients[0] > 0
    assert not any(opt.state.values())  # no momentum buffers


def test_a_non_finite_model_moves_nothing(monkeypatch):
    model = _mlp()
    opt = tekfac.KFAC(model, step_rule="quadratic", **FAST)
    x, y = _batches(1, n=6)[0]
    _step(model, opt, x, y)
    before = _flat(model)
    monkeypatch.setattr(tekfac.optim, "curvature_gram",
                        lambda *a: torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="non-finite quadratic model"):
        _step(model, opt, x, y)
    assert torch.equal(_flat(model), before)


def test_refusals_say_what_to_do():
    model = _mlp()
    with pytest.raises(ValueError, match=r"kl_clip.*quadratic"):
        tekfac.KFAC(model, step_rule="quadratic", kl_clip=1e-3)
    with pytest.raises(ValueError, match="nesterov=True with step_rule='quadratic'"):
        tekfac.KFAC(model, step_rule="quadratic", nesterov=True)
    with pytest.raises(ValueError, match="step_rule"):
        tekfac.KFAC(model, step_rule="adaptive")
    x, y = _batches(1, n=6)[0]
    opt = tekfac.KFAC(model, step_rule="quadratic", fisher="empirical")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"optimizer.backward\(loss, outputs\)"):
        opt.step()
    opt.preconditioner.remove_hooks()
    for options, match in (({"lr": 0.5}, "'lr'"), ({"momentum": 0.0}, "'momentum'")):
        opt = tekfac.KFAC(model, step_rule="quadratic", params=[
            {"params": [model[0].weight, model[0].bias], **options},
            {"params": [model[2].weight, model[2].bias]}])
        with pytest.raises(ValueError, match=match):
            _step(model, opt, x, y)
        opt.preconditioner.remove_hooks()


class FlashAttention(nn.Module):
    """Attention through ``F.scaled_dot_product_attention``'s fused CPU kernel, whose backward
    has no derivative (nanoGPT's attention)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1))


def test_an_operation_without_double_backward_is_refused_with_the_way_out():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = FlashAttention()  # float32: the fused kernel
    opt = tekfac.KFAC(model, step_rule="quadratic", **FAST)
    x, y = torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))

    def step():
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out.reshape(-1, 3), y.reshape(-1)), out.reshape(-1, 3))
        opt.step()

    try:
        step()
    except RuntimeError as e:
        assert "SDPBackend.MATH" in str(e) and "double backward" in str(e)
    else:  # a torch whose fused kernel gained a double backward: nothing to refuse
        pytest.skip("scaled_dot_product_attention's CPU kernel has a double backward here")
    with sdpa_kernel(SDPBackend.MATH):
        step()
    assert opt.step_coefficients is not None


def test_defaults_follow_the_step_rule():
    model = _mlp()
    quadratic = tekfac.TEKFAC(model, step_rule="quadratic")
    assert quadratic.param_groups[0]["lr"] == 1.0 and quadratic.param_groups[0]["kl_clip"] is None
    quadratic.preconditioner.remove_hooks()
    fixed = tekfac.TEKFAC(model)
    assert fixed.param_groups[0]["lr"] == 0.01 and fixed.param_groups[0]["kl_clip"] == 1e-3
