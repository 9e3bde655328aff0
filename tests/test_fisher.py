"""The MC Fisher of sequence outputs (docs/design.md §4b): whatever the layout of the tensor
given to the loss — ``(N, C)``, ``(N, C, T)`` or flattened ``(N·T, C)`` — the sampled output
gradients are per-example gradients of the loss averaged over each example's positions, so
their expected second moment is exact. Checked on the output-side KFAC factor of the last
layer, ``G = (1/N) Σ_i G_i G_iᵀ``, averaged over many draws of the labels, against its exact
expectation over the predictive distribution:

* cross-entropy: ``E[G] = (1/N) Σ_i Σ_t (diag p_it − p_it p_itᵀ) / T²``; the same for NLL of
  ``log_softmax`` outputs along the loss's class axis (``p`` from the logits);
* MSE (Gaussian, variance ½), averaged over ``T·C`` elements per example:
  ``E[G] = 2 / (T C²) · I``;
* BCE with logits: ``E[G] = (1/N) Σ_i Σ_t diag(σ_it (1 − σ_it)) / (T C)²``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac

N, T, D, C = 8, 3, 4, 5
DRAWS = 300


def sequence_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()


#: layout name → (the tensor given to the loss, from (N, T, C) logits; T of the model input)
LAYOUTS = {
    "(N, C)": (lambda z: z, 1),
    "(N, C, T)": (lambda z: z.transpose(1, 2), T),
    "(N*T, C)": (lambda z: z.reshape(-1, C), T),
    "(N, T, C) elementwise": (lambda z: z, T),  # MSE / BCE only: no class axis
}
CASES = [("cross_entropy", "(N, C)"), ("cross_entropy", "(N, C, T)"),
         ("cross_entropy", "(N*T, C)"), ("nll", "(N, C)"), ("nll", "(N*T, C)"),
         ("mse", "(N*T, C)"), ("mse", "(N, T, C) elementwise"),
         ("bce_with_logits", "(N*T, C)"), ("bce_with_logits", "(N, T, C) elementwise")]


def loss_outputs(loss: str, outputs: torch.Tensor) -> torch.Tensor:
    """What the model gives the loss: log-probabilities along the class axis for NLL (a model
    that ends in ``log_softmax``), else the tensor itself."""
    return outputs.log_softmax(dim=1) if loss == "nll" else outputs


def user_loss(loss: str, outputs: torch.Tensor) -> torch.Tensor:
    """The user's own batch-mean loss (its labels do not matter to the MC statistics)."""
    if loss in ("cross_entropy", "nll"):
        labels = torch.zeros_like(outputs.select(1, 0), dtype=torch.long)
        return (F.cross_entropy if loss == "cross_entropy" else F.nll_loss)(outputs, labels)
    if loss == "mse":
        return F.mse_loss(outputs, torch.zeros_like(outputs))
    return F.binary_cross_entropy_with_logits(outputs, torch.zeros_like(outputs))


def expected_g(loss: str, logits: torch.Tensor, t: int) -> torch.Tensor:
    """The exact expectation of ``G`` of the last layer; ``logits`` ``(N, t, C)``."""
    if loss in ("cross_entropy", "nll"):
        p = logits.softmax(-1)
        per_position = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
        return per_position.sum(dim=(0, 1)) / (N * t**2)
    if loss == "mse":
        return torch.eye(C, dtype=logits.dtype) * 2 / (t * C**2)
    s = logits.sigmoid()
    return torch.diag((s * (1 - s)).sum(dim=(0, 1))) / (N * (t * C) ** 2)


@pytest.mark.parametrize(("loss", "layout"), CASES)
def test_mc_output_factor_is_the_exact_expectation_for_every_layout(loss, layout):
    view, t = LAYOUTS[layout]
    net = sequence_model()
    x = torch.randn(N, t, D, dtype=torch.float64) if t > 1 else torch.randn(N, D,
                                                                            dtype=torch.float64)
    pre = tekfac.Preconditioner(net, "kfac", loss=loss, seed=0, cov_update_freq=1,
                                eigen_update_freq=10**9, stat_decay=0.0)
    head = pre.layers[-1]
    total = torch.zeros(C, C, dtype=torch.float64)
    for _ in range(DRAWS):
        logits = net(x)
        outputs = loss_outputs(loss, view(logits))
        net.zero_grad()
        pre.backward(user_loss(loss, outputs), outputs)
        pre.update_curvature()
        total += pre.states[head].factor_out
    with torch.no_grad():
        logits = net(x).reshape(N, t, C)
    expected = expected_g(loss, logits, t)
    assert (total / DRAWS - expected).norm() <= 0.08 * expected.norm(), (total / DRAWS, expected)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_logits_whose_class_axis_is_not_the_losses_are_refused(loss):
    """``(N, T, V)`` logits given to backward while the loss read ``logits.view(-1, V)``: the
    class axis (dimension 1) would be the positions; a clear error instead."""
    net = sequence_model()
    opt = tekfac.KFAC(net, loss=loss)
    outputs = net(torch.randn(N, T, D, dtype=torch.float64))
    if loss == "nll":
        outputs = outputs.log_softmax(dim=-1)
    with pytest.raises(ValueError, match=r"class axis.*view\(-1"):
        opt.backward(user_loss(loss, outputs.view(-1, C)), outputs)


def test_unbatched_logits_sample_along_their_only_axis():
    """``F.cross_entropy`` reads ``(C,)`` logits as one example; so does the sampler."""
    net = sequence_model()
    pre = tekfac.Preconditioner(net, "kfac", seed=0, cov_update_freq=1)
    out = net(torch.randn(D, dtype=torch.float64))
    pre.backward(F.cross_entropy(out, torch.tensor(0)), out)
    pre.update_curvature()
    assert pre.curvature(net[2]).dense().isfinite().all()


def test_layers_with_different_example_counts_each_get_their_own():
    """A head applied after flattening sees ``N·T`` rows, its examples; the layer before it
    sees ``N`` sequences. With the same labels (same seed, same rows), the first layer's
    factor equals that of the same model whose head runs on ``(N, T, ·)``, and the flattened
    head's is ``T`` times the unflattened one's (rows: ``g = p − e``; sequences:
    ``g_t = (p_t − e_t)/T``, ``T`` of them per example)."""
    x = torch.randn(N, T, D, dtype=torch.float64)
    flat = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Flatten(0, 1), nn.Linear(6, C)).double()
    whole = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    whole.load_state_dict({k.replace("3.", "2."): v for k, v in flat.state_dict().items()})
    factors = []
    for net, view in ((flat, lambda z: z), (whole, lambda z: z.reshape(-1, C))):
        pre = tekfac.Preconditioner(net, "kfac", seed=3, cov_update_freq=1)
        outputs = view(net(x))
        pre.backward(user_loss("cross_entropy", outputs), outputs)
        pre.update_curvature()
        factors.append([pre.states[la].factor_out for la in pre.layers])
    (first_flat, head_flat), (first_whole, head_whole) = factors
    torch.testing.assert_close(first_flat, first_whole)
    torch.testing.assert_close(head_flat, T * head_whole)



def test_masked_positions_add_nothing_to_the_mc_statistics(argmax_sampler):
    """``mask`` (``labels != -100``): with the same labels, the MC statistics of every layer
    equal the empirical statistics of the user's loss with ``ignore_index`` (the mean over
    the kept positions), and ``c`` counts the kept positions per example; without the mask
    the ignored positions' sampled gradients enter the output-side factors."""
    net = sequence_model()
    x = torch.randn(N, T, D, dtype=torch.float64)
    mask = torch.rand(N * T, generator=torch.Generator().manual_seed(1)) < 0.6

    def statistics(fisher, use_mask=True):
        pre = tekfac.Preconditioner(net, "kfac", fisher=fisher, seed=0, cov_update_freq=1,
                                    stat_decay=0.0)
        outputs = net(x).reshape(-1, C)
        labels = outputs.detach().argmax(1).masked_fill(~mask, -100)
        net.zero_grad()
        pre.backward(F.cross_entropy(outputs, labels), outputs, mask=mask if use_mask else None)
        pre.update_curvature()
        factors = [(pre.states[la].factor_in, pre.states[la].factor_out) for la in pre.layers]
        return factors, pre.curvature_multiplier()

    mc, c_mc = statistics("mc")
    empirical, c_empirical = statistics("empirical")
    assert argmax_sampler
    assert c_mc == c_empirical == pytest.approx(mask.sum().item() / N)
    for (a_mc, g_mc), (a_empirical, g_empirical) in zip(mc, empirical):
        torch.testing.assert_close(a_mc, a_empirical, rtol=1e-12, atol=0)
        torch.testing.assert_close(g_mc, g_empirical, rtol=1e-10, atol=1e-14)
    unmasked, c_unmasked = statistics("mc", use_mask=False)
    assert c_unmasked == T
    assert not torch.allclose(unmasked[-1][1], mc[-1][1], rtol=1e-3)


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits"])
def test_the_masked_sampled_loss_is_the_mean_over_the_kept_terms(loss):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 4, generator=gen) < 0.5
    per_term = tekfac.fisher.LIKELIHOODS[loss].loss(f, y, reduction="none")
    got = tekfac.fisher.sampled_loss(loss, f, y, "mean", mask)
    torch.testing.assert_close(got, per_term[mask].mean(), rtol=1e-14, atol=0)
    assert tekfac.fisher.sampled_loss(loss, f, y, "sum", mask) == pytest.approx(
        per_term[mask].sum().item(), rel=1e-14)


@pytest.mark.parametrize("mask", [torch.ones(N, T, dtype=torch.bool), torch.ones(N * T),
                                  [True] * (N * T)], ids=["shape", "dtype", "type"])
def test_a_mask_that_does_not_fit_the_terms_is_refused(mask):
    net = sequence_model()
    opt = tekfac.KFAC(net)
    outputs = net(torch.randn(N, T, D, dtype=torch.float64)).reshape(-1, C)
    with pytest.raises(ValueError, match=r"Invalid mask: expected a torch.bool tensor of "
                                         r"shape \(24,\)"):
        opt.backward(user_loss("cross_entropy", outputs), outputs, mask=mask)


def test_a_batch_of_one_sequence_with_a_flattened_head_is_not_a_broadcast():
    """The head after flattening sees the sequence's ``T`` rows while the layer before it sees
    one example: a batch of one, not an output shared by a batch (which is refused)."""
    net = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Flatten(0, 1), nn.Linear(6, C)).double()
    opt = tekfac.KFAC(net, cov_update_freq=1)
    for n in (2, 1):
        out = net(torch.randn(n, T, D, dtype=torch.float64))
        opt.zero_grad()
        opt.backward(user_loss("cross_entropy", out), out)
        opt.step()
    assert opt.preconditioner.steps == 2


def test_c_counts_the_kept_terms_of_all_micro_batches_in_any_order():
    """Two micro-batches with different kept densities: ``c = Σ M_j / Σ N_j`` whichever comes
    first (and a micro-batch without a kept term adds zeros, not NaN)."""
    net = sequence_model()
    x = torch.randn(2 * N, T, D, dtype=torch.float64)
    masks = [torch.rand(N * T, generator=torch.Generator().manual_seed(2)) < 0.3,
             torch.zeros(N * T, dtype=torch.bool)]
    expected = sum(m.sum().item() for m in masks) / (2 * N)
    for order in ((0, 1), (1, 0)):
        opt = tekfac.KFAC(net, seed=0, cov_update_freq=1, stat_decay=0.0)
        opt.zero_grad()
        for j in order:
            outputs = net(x[j * N:(j + 1) * N]).reshape(-1, C)
            labels = outputs.detach().argmax(1).masked_fill(~masks[j], -100)
            loss = F.cross_entropy(outputs, labels, reduction="sum") / (masks[0].sum() * 2)
            opt.backward(loss, outputs, mask=masks[j])
        opt.step()
        assert opt.preconditioner.curvature_multiplier() == pytest.approx(expected)
        assert not opt.faults
        assert all(p.isfinite().all() for p in net.parameters())
