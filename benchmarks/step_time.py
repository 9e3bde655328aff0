"""Per-step time of the six optimizers, its breakdown, its arithmetic floor and peak memory.

    python benchmarks/step_time.py [--quick] [--json] [--tasks ...] [--device cpu|cuda]

For each task (one batch of 128 real training images, or noise if the data set is missing)
and optimizer the script
trains ``--steps`` steps after a warm-up and reports, in milliseconds per step amortised at the
default update frequencies (statistics every 10 steps, eigendecompositions every 100):

* ``step_ms``: median over blocks of 10 consecutive steps (each block holds one statistics
  step) of the block's mean, plus the separately timed eigendecomposition / 100;
* a breakdown: forward, backward (with the MC sampled backward), statistics (collecting and
  the factor update), eigendecomposition, scaling update, preconditioning, parameter step;
* ``floor_ratio``: the predicted ratio to SGD if every step did only the arithmetic the method
  cannot avoid — SGD's ``6·N·T·d_in·d_out`` FLOPs per layer plus rotating the gradient into and
  out of the eigenbasis (``4·d_in·d_out·(d_in+d_out)``) and the amortised statistics (the input
  factor by the cheaper of unfolding and spatial correlation), eigendecomposition (``9·d³``)
  and scaling work (counted below, per layer);
* ``peak_mb``: the peak memory increase of the training (RSS high-water mark of a forked child
  on CPU, ``max_memory_allocated`` on CUDA).

All optimizers of a task are measured in the same run, so their ratios are comparable. On
CPU, subnormal floats are flushed to zero, as ``tekfac bench`` does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

import tekfac
from tekfac.bench.data import DataError, load_dataset
from tekfac.bench.optimizers import OPTIMIZERS, SECOND_ORDER, backward, make_optimizer
from tekfac.bench.tasks import TASKS

SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
          "digits": (1, 8, 8)}
COV, EIGEN = 10, 100
BATCH = 128
PHASES = ("forward", "backward", "statistics", "eigendecomposition", "scaling",
          "preconditioning", "parameter step")
#: the phases timed inside the optimizer's backward() and step(), by method name
INNER = {"_collect": "statistics", "_factor_statistics": "statistics",
         "_update_factors": "statistics", "_update_bases": "eigendecomposition",
         "_corrected_statistics": "scaling", "_update_corrected": "scaling",
         "directions": "preconditioning"}


class Timer:
    """Accumulates wall time per phase (CUDA-synchronised)."""

    def __init__(self, device: str):
        self.totals: dict[str, float] = defaultdict(float)
        self.cuda = device.startswith("cuda")

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.totals[phase] += time.perf_counter() - start

        setattr(obj, name, timed)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def layer_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(T, d_in, d_out, F_in)`` of every Linear/Conv layer: ``d_in`` with the bias column,
    ``F_in`` the FLOPs per example of its input factor (by unfolding or, for a convolution
    where cheaper, by spatial correlation: see :mod:`tekfac.patch_moments`)."""
    shapes, hooks = [], []
    for m in model.modules():
        if tekfac.layers.is_supported(m):
            def hook(mod, args, out, m=m):
                t = out[0].numel() // out.shape[1] if out.dim() > 2 else 1
                layer = tekfac.layers.KroneckerLayer("", m)
                shapes.append((t, layer.d_in, layer.d_out, layer.input_moment_flops(args[0][:1])))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


def floor_flops(method: str, shapes: list[tuple[int, int, int, int]], n: int = BATCH) -> float:
    """FLOPs per step the method cannot avoid, amortised (see the module docstring)."""
    total = 0.0
    for t, d_in, d_out, input_factor in shapes:
        rows = n * t
        total += 6 * rows * d_in * d_out  # SGD: forward, input and weight gradients
        if method not in SECOND_ORDER:
            continue
        total += 4 * d_in * d_out * (d_in + d_out)  # rotate into and out of the basis
        stats = n * input_factor + 2 * rows * d_out**2  # the two factors
        stats += 4 * rows * d_in * d_out  # the MC sampled backward (input gradients)
        if method == "tkfac" and t > 1:  # δ (TEKFAC skips it): cheaper of Gram / per-example forms
            stats += 2 * n * min(t * t * (d_in + d_out), t * d_in * d_out)
        if method in ("ekfac", "tekfac"):  # per-example gradients, rotated (cheaper order)
            rotate = (2 * rows * (d_in**2 + d_out**2) if t == 1 else
                      2 * n * min(t * (d_in**2 + d_out**2), d_in * d_out * (d_in + d_out)))
            stats += rotate + 2 * n * t * d_in * d_out
        total += stats / COV + 9 * (d_in**3 + d_out**3) / EIGEN
    return total


def sample_batch(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of real training images when the data set is installed, else uniform noise
    (the timings are data dependent: e.g. noise drives some statistics into float32
    subnormals, which are slow on CPUs)."""
    try:
        data = load_dataset(dataset)
        return data.train_x[:BATCH], data.train_y[:BATCH]
    except DataError:
        gen = torch.Generator().manual_seed(0)
        return (torch.rand(BATCH, *SHAPES[dataset], generator=gen),
                torch.randint(0, 10, (BATCH,), generator=gen))


def inner(timer: Timer) -> float:
    """Seconds spent so far in the optimizer's inner phases."""
    return sum(timer.totals[p] for p in set(INNER.values()))


def measure(task_name: str, optimizer: str, steps: int, device: str, queue=None) -> dict:
    """Train ``steps`` measured steps (after a warm-up of 10) on synthetic data."""
    task = TASKS[task_name]
    torch.manual_seed(0)
    model = task.build().to(device)
    x, y = (t.to(device) for t in sample_batch(task.dataset))
    opt = make_optimizer(optimizer, model, {"lr": 1e-3, "damping": 0.1}, task.loss,
                         task.weight_decay)
    timer = Timer(device)
    pre = getattr(opt, "preconditioner", None)
    if pre is not None:
        for name, phase in INNER.items():
            timer.wrap(pre, name, phase)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_times = []
    for i in range(10 + steps):
        if i == 10:
            timer.totals.clear()
        timer.sync()
        start = time.perf_counter()
        out = model(task.inputs(x))
        loss = task.loss_fn(out, task.targets(x, y))
        timer.sync()
        t_fwd, in_fwd = time.perf_counter(), inner(timer)
        opt.zero_grad(set_to_none=True)
        backward(opt, loss, out)  # the MC statistics are computed in here
        timer.sync()
        t_bwd, in_bwd = time.perf_counter(), inner(timer)
        opt.step()
        timer.sync()
        end = time.perf_counter()
        if i >= 10:
            step_times.append(end - start)
            timer.totals["forward"] += t_fwd - start
            timer.totals["backward"] += t_bwd - t_fwd - (in_bwd - in_fwd)
            timer.totals["parameter step"] += end - t_bwd - (inner(timer) - in_bwd)
    eigen_ms = 0.0
    if pre is not None:  # one more (warm) refresh of every basis, amortised over EIGEN steps
        timer.totals["eigendecomposition"] = 0.0
        pre._update_bases(pre.layers)
        eigen_ms = 1e3 * timer.totals["eigendecomposition"]
    blocks = [statistics.fmean(step_times[i:i + COV]) for i in range(0, steps - COV + 1, COV)]
    shapes = layer_shapes(model, x[:2])
    result = {
        "floor_ratio": floor_flops(optimizer, shapes) / floor_flops("sgd", shapes),
        "step_ms": 1e3 * statistics.median(blocks) + eigen_ms / EIGEN,
        "breakdown_ms": {p: 1e3 * timer.totals[p] / steps for p in PHASES},
        "peak_mb": (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                    else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024),
    }
    result["breakdown_ms"]["eigendecomposition"] = eigen_ms / EIGEN
    if queue is not None:
        queue.put(result)
    return result


def measure_isolated(task: str, optimizer: str, steps: int, device: str) -> dict:
    """On CPU, measure in a forked child so that its peak RSS is its own. (The parent runs
    no torch computation, so that forking cannot inherit a busy thread pool.)"""
    if device.startswith("cuda"):
        return measure(task, optimizer, steps, device)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(task, optimizer, steps, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 steps each (under a minute)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 200)")
    parser.add_argument("--tasks", nargs="+", default=["fmnist-cnn", "fmnist-autoencoder",
                                                       "fmnist-vgg"], choices=TASKS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    steps = args.steps or (20 if args.quick else 200)
    steps = max(COV, steps - steps % COV)
    if args.device == "cpu":  # as `tekfac bench` does: float32 subnormals are slow on CPUs
        torch.set_flush_denormal(True)
    report: dict[str, dict[str, dict]] = {}
    for task_name in args.tasks:
        rows = {optimizer: measure_isolated(task_name, optimizer, steps, args.device)
                for optimizer in args.optimizers}
        sgd_ms = rows["sgd"]["step_ms"] if "sgd" in rows else float("nan")
        for row in rows.values():
            row["ratio_vs_sgd"] = row["step_ms"] / sgd_ms
        report[task_name] = rows
        if not args.json:
            print_table(task_name, rows, steps, args.device)
    if args.json:
        print(json.dumps({t: {o: {k: r[k] for k in ("step_ms", "ratio_vs_sgd", "floor_ratio",
                                                    "peak_mb")}
                              for o, r in rows.items()} for t, rows in report.items()}))


def print_table(task: str, rows: dict[str, dict], steps: int, device: str) -> None:
    flush = ", subnormals flushed" if device == "cpu" else ""
    print(f"\n{task}: batch {BATCH}, {steps} measured steps, {device}, "
          f"{torch.get_num_threads()} threads{flush}")
    head = ["optimizer", "step ms", "×SGD", "floor×", "meas/floor", "peak MB",
            *(p[:9] for p in PHASES)]
    print(" ".join(f"{h:>10}" for h in head))
    for name, r in rows.items():
        cells = [name, f"{r['step_ms']:.1f}", f"{r['ratio_vs_sgd']:.2f}",
                 f"{r['floor_ratio']:.2f}", f"{r['ratio_vs_sgd'] / r['floor_ratio']:.2f}",
                 f"{r['peak_mb']:.0f}", *(f"{r['breakdown_ms'][p]:.2f}" for p in PHASES)]
        print(" ".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
