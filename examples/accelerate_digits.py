"""A small CNN trained on scikit-learn's digits with tekfac and ``accelerate``, with
gradient accumulation.

    python examples/accelerate_digits.py --epochs 3
    torchrun --nproc_per_node 2 examples/accelerate_digits.py  # DDP, statistics over both

The tekfac optimizer is built on the model before ``accelerator.prepare``;
:func:`tekfac.integrations.accelerate.backward` takes the place of
``accelerator.backward(loss)``, with the logits the loss is computed from.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tekfac
from tekfac.bench.data import load_dataset
from tekfac.integrations.accelerate import backward


def network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def train(epochs: int = 1, accumulate: int = 2, max_steps: int | None = None) -> list[float]:
    """Train; the loss of every micro-batch."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    net = network()
    opt = tekfac.TEKFAC(net, lr=0.05, damping=1e-2, cov_update_freq=1, eigen_update_freq=10,
                        seed=0)
    data = load_dataset("digits")
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=32)
    net, opt, loader = accelerator.prepare(net, opt, loader)
    losses: list[float] = []
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(net):
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                backward(accelerator, opt, loss, logits)
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
            if max_steps is not None and len(losses) >= max_steps * accumulate:
                return losses
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=2)
    args = parser.parse_args(argv)
    losses = train(args.epochs, args.accumulate)
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} after {len(losses)} "
          "micro-batches")
    return losses


if __name__ == "__main__":
    main()
