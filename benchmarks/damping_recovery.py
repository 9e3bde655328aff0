"""Does adaptive damping recover from a badly chosen damping? (docs/design.md §3, issue #17.)

Trains a small CNN on scikit-learn's digits (1797 8×8 images, batches of 64) from the same
initialisation and batches with: the library's damping 0.1 fixed, a damping 100× too small
(10⁻³) fixed, and 10⁻³ adapted by the Levenberg–Marquardt rule (default schedule: every 5
steps, ×(19/20)⁵; and every step, ×19/20), each with and without the default KL clip. Prints,
per run, the largest batch loss, the final loss on all 1797 images, the damping at steps
0/50/100/last and how the ratios ρ fell (above 3/4, below 1/4, no decrease predicted).

    python benchmarks/damping_recovery.py [--method tekfac] [--steps 150] [--lr 0.05]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import tekfac
from tekfac.damping_adaptation import DampingAdaptation


def cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def run(x, y, method: str, damping: float, adaptive, kl_clip, steps: int, lr: float) -> str:
    torch.manual_seed(0)
    model = cnn()
    opt = tekfac.KroneckerOptimizer(model, method, lr=lr, damping=damping, kl_clip=kl_clip,
                                    cov_update_freq=5, eigen_update_freq=20,
                                    damping_adaptive=adaptive)
    gen = torch.Generator().manual_seed(0)
    losses, dampings, ratios = [], [], []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)

        def closure(idx=idx):
            opt.zero_grad()
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            opt.backward(loss, out)
            return loss.detach()

        due = opt.damping_adaptation is not None and opt.damping_adaptation.due(
            opt.preconditioner.steps)
        losses.append(float(opt.step(closure)))
        dampings.append(opt.damping)
        if due:
            ratios.append(opt.reduction_ratio)
    with torch.no_grad():
        final = F.cross_entropy(model.eval()(x), y).item()
    high = sum(r is not None and r > 0.75 for r in ratios)
    low = sum(r is not None and r < 0.25 for r in ratios)
    none = sum(r is None for r in ratios)
    picks = [dampings[i] for i in (0, min(50, steps - 1), min(100, steps - 1), steps - 1)]
    schedule = ("fixed" if adaptive is False else
                f"LM every {adaptive.interval}" if isinstance(adaptive, DampingAdaptation)
                else "LM every 5")
    clip = "off" if kl_clip is None else f"{kl_clip:g}"
    return (f"{damping:>8g} {schedule:>11} {clip:>6} {max(losses):>10.3g} {final:>8.3f} "
            f"{' '.join(f'{d:.2g}' for d in picks):>30} "
            f"{f'{high}/{low}/{none} of {len(ratios)}' if ratios else '-':>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="tekfac", choices=list(tekfac.METHODS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    xs, ys = load_digits(return_X_y=True)
    x, y = torch.tensor(xs / 16, dtype=torch.float32), torch.tensor(ys)
    print(f"{args.method}, digits CNN, lr {args.lr}, momentum 0.9, {args.steps} steps of 64")
    print(f"{'damping':>8} {'schedule':>11} {'clip':>6} {'max loss':>10} {'final':>8} "
          f"{'damping at 0/50/100/last':>30} {'ρ>¾/ρ<¼/none':>14}")
    for kl_clip in (None, 1e-3):
        for damping, adaptive in ((0.1, False), (1e-3, False), (1e-3, True),
                                  (1e-3, DampingAdaptation(interval=1))):
            print(run(x, y, args.method, damping, adaptive, kl_clip, args.steps, args.lr),
                  flush=True)


if __name__ == "__main__":
    main()
