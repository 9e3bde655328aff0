"""``torch.optim.Muon`` with its Newton–Schulz orthogonalisation in float32 on CPU.

``torch.optim.Muon`` runs the iteration in bfloat16 (``torch.optim._muon.
_zeropower_via_newtonschulz`` casts the update with ``.bfloat16()``), a choice made for GPUs'
bfloat16 units. A CPU without them (this project's machine: no AVX512-BF16) multiplies
bfloat16 matrices several times slower than float32 ones: one orthogonalisation of a 1000x785
update takes seconds, and Muon's step on the Fashion-MNIST autoencoder ~10 s
(``python benchmarks/muon_precision.py``). :class:`CPUMuon` keeps everything else of torch's
Muon (momentum, Nesterov, the learning-rate adjustment, decoupled weight decay, the
coefficients, the number of steps) and changes only the precision of that iteration, for CPU
tensors; on any other device it is torch's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.optim._muon as torch_muon
from torch import Tensor

_TORCH_ITERATION = torch_muon._zeropower_via_newtonschulz


def newton_schulz_float32(update: Tensor, ns_coefficients: tuple[float, float, float],
                          ns_steps: int, eps: float) -> Tensor:
    """Muon's quintic Newton–Schulz iteration (Jordan et al. 2024) in float32.

    With ``X`` the update ``(m, n)``, transposed if ``m > n`` so that it has no more rows than
    columns, and scaled to unit Frobenius norm (``max(‖X‖_F, eps)``), repeat ``ns_steps`` times
    ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ`` and ``(a, b, c) = ns_coefficients``; the
    result, in the update's orientation, approximates ``U Vᵀ`` of its SVD ``U S Vᵀ``.
    Same signature as torch's bfloat16 ``_zeropower_via_newtonschulz``.
    """
    a, b, c = ns_coefficients
    x = update.float()
    wide = update.size(0) <= update.size(1)
    if not wide:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


def _iteration(update: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
               eps: float) -> Tensor:
    """:func:`newton_schulz_float32` for a CPU tensor, torch's own iteration otherwise."""
    if update.device.type == "cpu":
        return newton_schulz_float32(update, ns_coefficients, ns_steps, eps)
    return _TORCH_ITERATION(update, ns_coefficients, ns_steps, eps)


@contextmanager
def _float32_iteration() -> Iterator[None]:
    """Within the block, torch's Muon orthogonalises CPU updates in float32."""
    torch_muon._zeropower_via_newtonschulz = _iteration
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = _TORCH_ITERATION


class CPUMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton–Schulz iteration runs in float32 on CPU (see the
    module's docstring); same arguments, state and ``state_dict`` as torch's."""

    def step(self, closure=None):  # type: ignore[override]
        with _float32_iteration():
            return super().step(closure)
