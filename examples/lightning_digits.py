"""A small CNN trained on scikit-learn's digits with tekfac under Lightning's automatic
optimisation.

    python examples/lightning_digits.py --epochs 3

The module lists :class:`tekfac.integrations.lightning.TekfacBackward` before
``LightningModule`` and names, in ``training_step``, the logits its loss is computed from
(``self.tekfac_outputs(logits)``); the mixin's ``backward`` hook then routes Lightning's
backward through ``optimizer.backward(loss, logits)``, so the default MC Fisher works.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tekfac
from tekfac.bench.data import load_dataset
from tekfac.integrations.lightning import TekfacBackward


def network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


class DigitsClassifier(TekfacBackward, pl.LightningModule):
    def __init__(self, net: nn.Module, fisher: str = "mc", lr: float = 0.05):
        super().__init__()
        self.net, self.fisher, self.lr = net, fisher, lr
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        self.tekfac_outputs(logits)
        loss = F.cross_entropy(logits, y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> tekfac.TEKFAC:
        return tekfac.TEKFAC(self.net, lr=self.lr, fisher=self.fisher, damping=1e-2,
                             cov_update_freq=1, eigen_update_freq=10, seed=0)


def loader(batch_size: int = 64) -> DataLoader:
    data = load_dataset("digits")
    return DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=batch_size)


def trainer(max_steps: int = -1, epochs: int = 1, accumulate: int = 1) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accumulate_grad_batches=accumulate)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--fisher", choices=["mc", "empirical"], default="mc")
    args = parser.parse_args(argv)
    module = DigitsClassifier(network(), args.fisher)
    trainer(args.max_steps, args.epochs).fit(module, loader())
    losses = module.losses
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} after {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
