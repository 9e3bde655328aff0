"""The benchmark's Muon: torch's Muon with its Newton–Schulz iteration in float32 on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.optim._muon as torch_muon

from tekfac.bench.muon import CPUMuon, newton_schulz_float32

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _iteration_float64(update: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration written out in float64 on the wide orientation."""
    a, b, c = COEFFICIENTS
    x = update.double()
    x = x if x.shape[0] <= x.shape[1] else x.T
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if update.shape[0] <= update.shape[1] else x.T


@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
def test_float32_iteration_is_the_quintic_iteration(shape):
    update = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz_float32(update, COEFFICIENTS, 5, 1e-7)
    assert ours.dtype == torch.float32 and ours.shape == update.shape
    torch.testing.assert_close(ours.double(), _iteration_float64(update, 5), rtol=1e-5,
                               atol=1e-5)
    # and torch's bfloat16 iteration computes the same map, to bfloat16's precision, which
    # depends on the CPU's bfloat16 matmul kernel (oneDNN's AVX-512-BF16 or AMX, ARM's bf16,
    # a float32-accumulating fallback): 0.019 of the largest entry on an AVX2 machine; a wrong
    # map (coefficients, orientation, normalisation) is off by order one
    theirs = torch_muon._zeropower_via_newtonschulz(update, COEFFICIENTS, 5, 1e-7)
    assert (theirs.float() - ours).abs().max() < 0.1 * ours.abs().max()
    # its singular values are near one (Muon's intent), not the update's
    s = torch.linalg.svdvals(ours)
    assert s.min() > 0.3 and s.max() < 1.3
    assert torch.linalg.svdvals(update).max() > 3


def test_cpu_muon_steps_as_torch_muon_and_restores_torch_iteration():
    torch.manual_seed(0)
    weights = [torch.randn(20, 9, requires_grad=True) for _ in range(2)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    ours = CPUMuon(weights, lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    theirs = torch.optim.Muon(copies, lr=0.05, weight_decay=0.1,
                              adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(20, 9) for _ in weights]
        for w, c, g in zip(weights, copies, grads, strict=True):
            w.grad, c.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for w, c in zip(weights, copies, strict=True):
        assert not torch.equal(w, c)  # float32 against bfloat16 iterations
        # 1.1e-3 on an AVX2 machine; the bound leaves room for other bfloat16 kernels, and
        # a wrong step (each moves the weights by about 0.05) is far outside it
        torch.testing.assert_close(w, c, rtol=0, atol=6e-3)
    assert torch_muon._zeropower_via_newtonschulz.__name__ == "_zeropower_via_newtonschulz"
    assert set(ours.state_dict()["state"][0]) == set(theirs.state_dict()["state"][0])
