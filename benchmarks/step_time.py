"""Per-step time of the six optimizers, its breakdown, its arithmetic floor and peak memory.

    python benchmarks/step_time.py [--quick] [--json] [--tasks ...] [--device cpu|cuda]

For each task (one batch of 128 real training images, or noise if the data set is missing)
and optimizer the script trains ``--steps`` steps after a warm-up, in ``--rounds`` rounds that
visit the optimizers in turn (so that a drift of the machine's speed affects them alike), and
reports, in milliseconds per step amortised at the default update frequencies (statistics every
10 steps, eigendecompositions every 100):

* ``step_ms``: per round, the median over blocks of 10 consecutive steps (each block holds one
  statistics step) of the block's mean, plus the separately timed eigendecomposition / 100;
  the median over rounds;
* ``ratio_vs_sgd``: the median over rounds of ``step_ms`` divided by SGD's of the same round;
* a breakdown: forward, backward (with the MC sampled backward), statistics (collecting and
  the factor update), eigendecomposition, scaling update, preconditioning, parameter step;
* ``floor_ratio``: the predicted ratio to SGD if every step did only the arithmetic the method
  cannot avoid — SGD's ``6·N·T·d_in·d_out`` FLOPs per layer (forward, input and weight
  gradients; the first layer has no input gradient) plus rotating the gradient into and out of
  the eigenbasis (``4·d_in·d_out·(d_in+d_out)``) and the amortised statistics (the sampled
  backward's input gradients, the input factor by the cheaper of unfolding and spatial
  correlation), eigendecomposition (``9·d³``) and scaling work (counted below, per layer);
* ``peak_mb``: the peak memory of live tensors in a separate short run (model, batch and
  optimizer state included; see :func:`peak_memory_mb`).

On CPU, subnormal floats are flushed to zero, as ``tekfac bench`` does.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import tempfile
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
    """``(T, d_in, d_out, F_in)`` of every Linear/Conv layer in forward order: ``d_in`` with the
    bias column, ``F_in`` the FLOPs per example of its input factor (by unfolding or, for a
    convolution where cheaper, by spatial correlation: see :mod:`tekfac.patch_moments`)."""
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
    for i, (t, d_in, d_out, input_factor) in enumerate(shapes):
        rows = n * t
        input_gradient = 2 * rows * d_in * d_out if i else 0  # the model input needs none
        total += 4 * rows * d_in * d_out + input_gradient  # SGD: forward, weight gradient
        if method not in SECOND_ORDER:
            continue
        total += 4 * d_in * d_out * (d_in + d_out)  # rotate into and out of the basis
        stats = n * input_factor + 2 * rows * d_out**2  # the two factors
        stats += input_gradient  # the MC sampled backward (output gradients only)
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


def build(task_name: str, optimizer: str, device: str, batch: tuple[torch.Tensor, torch.Tensor],
          **options: object):
    """The task, its model, a copy of ``batch`` on ``device`` and the optimizer (default
    settings, updated by ``options``)."""
    task = TASKS[task_name]
    torch.manual_seed(0)
    model = task.build().to(device)
    x, y = (t.to(device, copy=True) for t in batch)
    opt = make_optimizer(optimizer, model, {"lr": 1e-3, "damping": 0.1}, task.loss,
                         task.weight_decay, **options)
    return task, model, x, y, opt


def measure(task_name: str, optimizer: str, steps: int, device: str, memory: bool = True,
            queue=None) -> dict:
    """Train ``steps`` measured steps (after a warm-up of 10) on one batch; then, if
    ``memory``, measure the peak memory (:func:`peak_memory_mb`)."""
    batch = sample_batch(TASKS[task_name].dataset)
    task, model, x, y, opt = build(task_name, optimizer, device, batch)
    timer = Timer(device)
    pre = getattr(opt, "preconditioner", None)
    if pre is not None:
        for name, phase in INNER.items():
            timer.wrap(pre, name, phase)
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
    }
    result["breakdown_ms"]["eigendecomposition"] = eigen_ms / EIGEN
    del model, opt, pre, timer  # not counted by the memory run
    if memory:
        result["peak_mb"] = peak_memory_mb(task_name, optimizer, device, batch)
    if queue is not None:
        queue.put(result)
    return result


def peak_memory_mb(task_name: str, optimizer: str, device: str,
                   batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Peak MiB of live tensors — the model, a copy of ``batch`` and the optimizer state
    included — over 5 steps with statistics every 2 and eigendecompositions every 4 steps, so
    that they hold every kind of step: the first (every statistic, then the bases), a
    statistics step that keeps the bases (EKFAC/TEKFAC then estimate the scaling between the
    two backward passes, while the graph is alive) and a refresh of existing bases. (Memory
    does not depend on the frequencies.) The same quantity on both devices: on CUDA
    ``max_memory_allocated``, on CPU every allocation and free the profiler records."""
    options = dict(cov_update_freq=2, scale_update_freq=2, eigen_update_freq=4) \
        if optimizer in SECOND_ORDER else {}
    gc.collect()  # the timed run sits in reference cycles (hooks, wrapped methods): free it

    def train() -> None:
        task, model, x, y, opt = build(task_name, optimizer, device, batch, **options)
        for _ in range(5):
            out = model(task.inputs(x))
            loss = task.loss_fn(out, task.targets(x, y))
            opt.zero_grad(set_to_none=True)
            backward(opt, loss, out)
            opt.step()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        train()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"),
               default=0) / 2**20


def measure_isolated(task: str, optimizer: str, steps: int, device: str, memory: bool) -> dict:
    """On CPU, measure in a forked child, so that every optimizer starts from the same process
    state (allocator, caches). (The parent runs no torch computation, so that forking cannot
    inherit a busy thread pool.)"""
    if device.startswith("cuda"):
        return measure(task, optimizer, steps, device, memory)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(task, optimizer, steps, device, memory, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="10 steps, one round (under a minute)")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per round (default 100)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over all optimizers, interleaved (default 3)")
    parser.add_argument("--tasks", nargs="+", default=["fmnist-cnn", "fmnist-autoencoder",
                                                       "fmnist-vgg"], choices=TASKS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    steps = args.steps or (10 if args.quick else 100)
    steps = max(COV, steps - steps % COV)
    rounds = max(1, args.rounds or (1 if args.quick else 3))
    if args.device == "cpu":  # as `tekfac bench` does: float32 subnormals are slow on CPUs
        torch.set_flush_denormal(True)
    report: dict[str, dict[str, dict]] = {}
    for task_name in args.tasks:
        runs: dict[str, list[dict]] = {optimizer: [] for optimizer in args.optimizers}
        for k in range(rounds):
            for optimizer in args.optimizers:
                runs[optimizer].append(measure_isolated(task_name, optimizer, steps,
                                                        args.device, memory=k == 0))
        rows = {optimizer: combine(results, runs.get("sgd")) for optimizer, results in runs.items()}
        report[task_name] = rows
        if not args.json:
            print_table(task_name, rows, steps, rounds, args.device)
    if args.json:
        print(json.dumps({t: {o: {k: r[k] for k in ("step_ms", "ratio_vs_sgd", "floor_ratio",
                                                    "peak_mb")}
                              for o, r in rows.items()} for t, rows in report.items()}))


def combine(results: list[dict], sgd: list[dict] | None) -> dict:
    """One optimizer's rounds: the median step, the median of its same-round ratios to SGD,
    the mean breakdown, the first round's peak memory (and its ratio to SGD's)."""
    nan = float("nan")
    ratios = [r["step_ms"] / s["step_ms"] for r, s in zip(results, sgd)] if sgd else [nan]
    return {
        "step_ms": statistics.median(r["step_ms"] for r in results),
        "ratio_vs_sgd": statistics.median(ratios),
        "floor_ratio": results[0]["floor_ratio"],
        "peak_mb": results[0]["peak_mb"],
        "memory_vs_sgd": results[0]["peak_mb"] / sgd[0]["peak_mb"] if sgd else nan,
        "breakdown_ms": {p: statistics.fmean(r["breakdown_ms"][p] for r in results)
                         for p in PHASES},
    }


def print_table(task: str, rows: dict[str, dict], steps: int, rounds: int, device: str) -> None:
    flush = ", subnormals flushed" if device == "cpu" else ""
    print(f"\n{task}: batch {BATCH}, {rounds} × {steps} measured steps, {device}, "
          f"{torch.get_num_threads()} threads{flush}")
    head = ["optimizer", "step ms", "×SGD", "floor×", "meas/floor", "peak MB", "mem×SGD",
            *(p[:9] for p in PHASES)]
    print(" ".join(f"{h:>10}" for h in head))
    for name, r in rows.items():
        cells = [name, f"{r['step_ms']:.1f}", f"{r['ratio_vs_sgd']:.2f}",
                 f"{r['floor_ratio']:.2f}", f"{r['ratio_vs_sgd'] / r['floor_ratio']:.2f}",
                 f"{r['peak_mb']:.0f}", f"{r['memory_vs_sgd']:.2f}",
                 *(f"{r['breakdown_ms'][p]:.2f}" for p in PHASES)]
        print(" ".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
