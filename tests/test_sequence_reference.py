"""A language model's curvature against dense per-example references, for both Fisher kinds
and every layout of the tensor given to the loss (docs/design.md §1, §4b).

The model is a token embedding, a Linear on ``(N, T, d)`` and a head giving ``(N, T, C)``
outputs; the loss is a batch mean over all ``N·T`` positions (and classes, for the
element-wise losses), given the outputs in the layout under test. An example is a sequence:
its loss is the mean over its positions, so the reference differentiates each sequence's
loss alone. The MC Fisher's labels are replaced by a deterministic function of the outputs,
so that both kinds are exact here (the sampler's distribution is tested in
``tests/test_fisher.py``); the reference uses the same labels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
import tekfac.fisher
from tests.reference import layer_references

N, T, V, D, C = 6, 4, 7, 5, 3
TOL = dict(rtol=1e-8, atol=1e-10)
EVERY_STEP = dict(cov_update_freq=1, eigen_update_freq=1, scale_update_freq=1, stat_decay=0.0)

#: layout → (loss, outputs ``(N, T, C)`` → the tensor given to the loss, labels ``(N, T)`` or
#: targets ``(N, T, C)`` → the labels in that layout)
LAYOUTS = {
    "cross_entropy (N*T, C)": ("cross_entropy", lambda z: z.reshape(-1, C),
                               lambda y: y.reshape(-1)),
    "cross_entropy (N, C, T)": ("cross_entropy", lambda z: z.transpose(1, 2), lambda y: y),
    "mse (N, T, C)": ("mse", lambda z: z, lambda y: y),
    "mse (N*T, C)": ("mse", lambda z: z.reshape(-1, C), lambda y: y.reshape(-1, C)),
    "bce_with_logits (N*T, C)": ("bce_with_logits", lambda z: z.reshape(-1, C),
                                 lambda y: y.reshape(-1, C)),
}
LOSS_FNS = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss,
            "bce_with_logits": F.binary_cross_entropy_with_logits}


def fixed_targets(loss: str, logits: torch.Tensor) -> torch.Tensor:
    """Labels ``(N, T)`` or targets ``(N, T, C)`` as a function of ``(N, T, C)`` logits."""
    logits = logits.detach()
    if loss == "cross_entropy":
        return logits.argmax(-1)
    if loss == "mse":
        return logits.sin()
    return (logits > 0).to(logits.dtype)


def language_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, D), nn.Linear(D, D), nn.Tanh(), nn.Linear(D, C)).double()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sequence_curvature_matches_the_dense_reference(layout, fisher, method, monkeypatch):
    loss_name, view, view_labels = LAYOUTS[layout]
    loss_fn = LOSS_FNS[loss_name]
    net = language_model()
    tokens = torch.randint(0, V, (N, T))
    logits = net(tokens)
    if fisher == "mc":  # labels drawn from the model, here a fixed function of its outputs
        labels = fixed_targets(loss_name, logits)
        monkeypatch.setattr(tekfac.fisher, "sample_targets",
                            lambda loss, outputs, generator: view_labels(labels))
        users = torch.zeros_like(labels)  # the user's own labels play no part
    else:
        labels = users = fixed_targets(loss_name, logits + torch.randn_like(logits))

    def loss_of(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(view(outputs), view_labels(y))

    refs = layer_references(net, tokens, labels, loss_of)
    pre = tekfac.Preconditioner(net, method, fisher=fisher, loss=loss_name, **EVERY_STEP)
    outputs = view(net(tokens))
    pre.backward(loss_fn(outputs, view_labels(users)), outputs)
    pre.update_curvature()
    for module, ref in refs.items():
        curv = pre.curvature(module)
        q = torch.kron(*curv.eigenbasis())
        if method == "kfac":
            expected = ref.kfac_dense()
        elif method == "tkfac":
            expected = ref.tkfac_dense()
        else:
            expected = (q * torch.diagonal(q.T @ ref.fisher @ q)) @ q.T
        torch.testing.assert_close(curv.dense() / curv.multiplier, expected, **TOL)  # F̂
