"""Soak test: many steps of each Kronecker method on fmnist-cnn, watching for NaN and growth.

    python benchmarks/soak.py [--steps 5000] [--methods kfac ekfac tkfac tekfac]

Trains on the real Fashion-MNIST training set (looping over epochs) with the tuned
hyper-parameters and the default update frequencies, and samples the process's resident set
size every ``--every`` steps. Reports per method: steps run, non-finite losses, skipped
steps, final training loss (mean of the last 100), RSS at the first sample, at the end and at
its maximum, and the least-squares RSS slope over the second half of the run (MB per 1000
steps; ≈ 0 means no growth).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch

from tekfac.bench.data import iterate_minibatches, load_dataset
from tekfac.bench.optimizers import backward, make_optimizer
from tekfac.bench.tasks import TASKS
from tekfac.bench.tune import load_hparams


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, MB), in MB per 1000 steps."""
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def soak(method: str, steps: int, every: int, data) -> dict:
    task = TASKS["fmnist-cnn"]
    torch.manual_seed(0)
    model = task.build()
    opt = make_optimizer(method, model, load_hparams(task.name)[0][method], task.loss,
                         task.weight_decay)
    gen = torch.Generator().manual_seed(0)
    losses, samples, nonfinite, skipped = [], [], 0, 0
    step = 0
    start = time.perf_counter()
    while step < steps:
        for xb, yb in iterate_minibatches(data.train_x, data.train_y, 128, gen):
            outputs = model(task.inputs(xb))
            loss = task.loss_fn(outputs, yb)
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                backward(opt, loss, outputs)
                opt.step()
            skipped += sum("skipping this step" in str(w.message) for w in caught)
            value = loss.item()
            nonfinite += not math.isfinite(value)
            losses.append(value)
            step += 1
            if step % every == 0:
                samples.append((step, rss_mb()))
            if step == steps:
                break
    half = [p for p in samples if p[0] > steps // 2]
    return dict(method=method, steps=step, nonfinite=nonfinite, skipped=skipped,
                final_loss=statistics.fmean(losses[-100:]), rss_first=samples[0][1],
                rss_end=samples[-1][1], rss_max=max(m for _, m in samples),
                slope=slope(half) if len(half) > 1 else 0.0,
                seconds=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=250, help="RSS sampling interval")
    parser.add_argument("--methods", nargs="+", default=["kfac", "ekfac", "tkfac", "tekfac"])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    data = load_dataset("fashion-mnist", args.data_dir)
    print(f"{'method':>7} {'steps':>6} {'NaN':>4} {'skipped':>7} {'final loss':>10} "
          f"{'RSS first':>9} {'RSS end':>8} {'RSS max':>8} {'MB/1k steps':>11} {'s':>6}")
    for method in args.methods:
        r = soak(method, args.steps, args.every, data)
        print(f"{r['method']:>7} {r['steps']:>6} {r['nonfinite']:>4} {r['skipped']:>7} "
              f"{r['final_loss']:>10.4f} {r['rss_first']:>9.0f} {r['rss_end']:>8.0f} "
              f"{r['rss_max']:>8.0f} {r['slope']:>11.2f} {r['seconds']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
