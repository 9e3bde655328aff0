"""Accuracy and cost of the cheap eigenbasis refresh (``basis_refresh_freq``, docs/design.md
§4.2) against full eigendecompositions, on the factors of a real training run.

    python benchmarks/basis_refresh.py [--task fmnist-cnn] [--steps 60] [--every 20]

Trains ``--task`` with KFAC (factors every step, a full eigendecomposition every ``--every``
steps, batch 128) and, for every factor of every layer, follows two bases between full
decompositions: the *stale* one (the last full decomposition, what the optimizer uses without
refreshes) and a *refreshed* one (one power-iteration step and a QR from the previous basis at
every step, what ``basis_refresh_freq=1`` does). Printed: the median over factors of
``‖offdiag(Uᵀ F U)‖ / ‖F‖`` (0 for an exact eigenbasis) for both, by steps since the last full
decomposition, and the median time of ``eigh`` and of the refresh per factor size (5
interleaved repeats, one thread, as the library runs them on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tekfac
from tekfac.bench.data import iterate_minibatches, load_dataset
from tekfac.bench.tasks import TASKS
from tekfac.linalg import power_iteration_refresh, symmetric_eigh


def off_diagonal(matrix: torch.Tensor, basis: torch.Tensor) -> float:
    rotated = basis.T @ matrix @ basis
    return float((rotated - torch.diag(rotated.diagonal())).norm() / matrix.norm())


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fmnist-cnn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = TASKS[args.task]
    data = load_dataset(task.dataset)
    model = task.build()
    opt = tekfac.KFAC(model, lr=0.01, cov_update_freq=1, eigen_update_freq=args.every,
                      fisher="empirical")
    pre = opt.preconditioner
    errors: dict[int, tuple[list[float], list[float]]] = {}
    refreshed: dict[tuple, torch.Tensor] = {}
    factors: dict[int, torch.Tensor] = {}
    batches = iterate_minibatches(data.train_x, data.train_y, 128, torch.Generator())
    for step in range(args.steps):
        x, y = next(batches)
        outputs = task.forward(model, task.inputs(x))
        opt.zero_grad()
        task.loss_fn(outputs, task.targets(x, y)).backward()
        opt.step()
        since = step % args.every
        for layer in pre.layers:
            state = pre.states[layer]
            for side in ("in", "out"):
                key = (layer.name, side)
                factor, basis = getattr(state, f"factor_{side}"), getattr(state, f"basis_{side}")
                if since == 0:
                    refreshed[key] = basis
                    factors[len(factor)] = factor
                    continue
                refreshed[key] = power_iteration_refresh(factor, refreshed[key])[1]
                stale_err, fresh_err = errors.setdefault(since, ([], []))
                stale_err.append(off_diagonal(factor, basis))
                fresh_err.append(off_diagonal(factor, refreshed[key]))
    print(f"{args.task}, KFAC, full eigendecomposition every {args.every} steps, "
          f"{len(pre.layers)} layers × 2 factors; median ‖offdiag(UᵀFU)‖/‖F‖")
    print(f"{'steps since eigh':>17} {'stale basis':>12} {'refreshed':>10}")
    for since in sorted(errors):
        if since in (1, 2, 5, 10) or since == args.every - 1:
            stale_err, fresh_err = errors[since]
            print(f"{since:>17} {statistics.median(stale_err):>12.2e} "
                  f"{statistics.median(fresh_err):>10.2e}")
    print(f"\n{'factor size':>11} {'eigh ms':>8} {'refresh ms':>10} {'ratio':>6}")
    for size, factor in sorted(factors.items()):
        basis = symmetric_eigh(factor)[1]
        eigh_s, refresh_s = [], []
        for _ in range(5):
            eigh_s.append(timed(symmetric_eigh, factor))
            refresh_s.append(timed(power_iteration_refresh, factor, basis))
        e, r = statistics.median(eigh_s) * 1e3, statistics.median(refresh_s) * 1e3
        print(f"{size:>11} {e:>8.2f} {r:>10.2f} {e / r:>6.1f}")


if __name__ == "__main__":
    main()
