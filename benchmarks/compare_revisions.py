"""Step times of two checkouts of tekfac, interleaved in the same run (before/after a change).

    python benchmarks/compare_revisions.py BEFORE_DIR AFTER_DIR [--rounds 3] [--steps 50]
        [--tasks fmnist-cnn fmnist-autoencoder] [--optimizers sgd kfac ekfac tkfac tekfac]

``BEFORE_DIR`` and ``AFTER_DIR`` are checkouts (e.g. ``git worktree add /tmp/before REV``).
Each measurement runs in a fresh process that imports ``tekfac`` from one checkout (first on
``PYTHONPATH``; the script checks which one was imported) and trains ``--steps`` steps, after
10 warm-up steps, on one batch of 128 real training images with the benchmark's optimizer
settings, subnormals flushed; its step time is the median over blocks of 10 steps (one
statistics step each) of the block's mean. Rounds visit every (task, optimizer) in turn and
alternate which checkout goes first, so that a drift of the machine's speed affects both
alike. Reported: each checkout's median over rounds and the median of the same-round ratios
``after / before``. Only APIs that both checkouts share are used (``tekfac.bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCH, WARMUP, BLOCK = 128, 10, 10


def child(task_name: str, optimizer: str, steps: int) -> None:
    """Measure one (task, optimizer) with the ``tekfac`` this process imports; print JSON."""
    import torch

    import tekfac
    from tekfac.bench.data import load_dataset
    from tekfac.bench.optimizers import backward, make_optimizer
    from tekfac.bench.tasks import TASKS

    torch.set_flush_denormal(True)
    task = TASKS[task_name]
    data = load_dataset(task.dataset)
    x, y = data.train_x[:BATCH].clone(), data.train_y[:BATCH].clone()
    torch.manual_seed(0)
    model = task.build()
    opt = make_optimizer(optimizer, model, {"lr": 1e-3, "damping": 0.1}, task.loss,
                         task.weight_decay)
    times = []
    for i in range(WARMUP + steps):
        start = time.perf_counter()
        out = model(task.inputs(x))
        loss = task.loss_fn(out, task.targets(x, y))
        opt.zero_grad(set_to_none=True)
        backward(opt, loss, out)
        opt.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    blocks = [statistics.fmean(times[i:i + BLOCK]) for i in range(0, steps, BLOCK)]
    print(json.dumps({"file": tekfac.__file__, "ms": 1e3 * statistics.median(blocks)}))


def measure(tree: Path, task: str, optimizer: str, steps: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, __file__, "--child", task, optimizer, str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(record["file"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"measured {record['file']}, not the checkout {tree}")
    return record["ms"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="measured steps (multiple of 10)")
    parser.add_argument("--tasks", nargs="+", default=["fmnist-cnn", "fmnist-autoencoder"])
    parser.add_argument("--optimizers", nargs="+",
                        default=["sgd", "kfac", "ekfac", "tkfac", "tekfac"])
    args = parser.parse_args()
    steps = max(BLOCK, args.steps - args.steps % BLOCK)
    trees = {"before": args.before, "after": args.after}
    ms: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for task in args.tasks:
            for optimizer in args.optimizers:
                order = list(trees) if r % 2 == 0 else list(trees)[::-1]
                for name in order:
                    ms.setdefault((task, optimizer, name), []).append(
                        measure(trees[name], task, optimizer, steps))
    print(f"{args.rounds} rounds × {steps} steps, batch {BATCH}, before = {args.before}, "
          f"after = {args.after}")
    print(f"{'task':>20} {'optimizer':>9} {'before ms':>10} {'after ms':>9} {'after/before':>13}"
          "  per round")
    for task in args.tasks:
        for optimizer in args.optimizers:
            before, after = ms[(task, optimizer, "before")], ms[(task, optimizer, "after")]
            ratios = [a / b for a, b in zip(after, before)]
            print(f"{task:>20} {optimizer:>9} {statistics.median(before):>10.1f} "
                  f"{statistics.median(after):>9.1f} {statistics.median(ratios):>13.3f}  "
                  + " ".join(f"{q:.3f}" for q in ratios))


if __name__ == "__main__":
    main()
