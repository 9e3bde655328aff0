"""Training smoke tests: every method learns scikit-learn's digits and stays finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import tekfac


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("build", [mlp, cnn])
def test_each_method_lowers_the_training_loss(build, method, digits):
    x, y = digits
    torch.manual_seed(0)
    model = build()
    opt = tekfac.KroneckerOptimizer(model, method, lr=0.05, damping=0.1,
                                    cov_update_freq=5, eigen_update_freq=20)
    with torch.no_grad():
        initial = F.cross_entropy(model.eval()(x), y).item()
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx])
        opt.zero_grad()
        opt.backward(loss, out)
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model.eval()(x), y).item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert final < 0.25 * initial, f"{method}: {initial:.3f} -> {final:.3f}"
