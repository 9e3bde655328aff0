"""Per-step time of the six optimizers, its breakdown, its arithmetic floor and peak memory.

    python benchmarks/step_time.py [--quick] [--json] [--tasks ...] [--device cpu|cuda]
                                   [--damping-adaptive] [--step-rule fixed|quadratic]
                                   [--compile]

For each task (one batch of 128 real training images, or noise if the data set is missing)
and optimizer the script trains ``--steps`` steps after a warm-up, in ``--rounds`` rounds that
visit the optimizers in turn (so that a drift of the machine's speed affects them alike), and
reports, in milliseconds per step amortised at the default update frequencies (statistics every
10 steps, eigendecompositions every 100):

* ``step_ms``: per round, the median over blocks of 10 consecutive steps (each block holds one
  statistics step) of the block's mean, plus the separately timed eigendecomposition / 100;
  the median over rounds (the timed steps run without the profiler);
* ``ratio_vs_sgd``: the median over rounds of ``step_ms`` divided by SGD's of the same round;
* a breakdown: forward, backward (with the MC sampled backward), statistics (collecting and
  the factor update), eigendecomposition, scaling update, preconditioning, parameter step,
  read from the library's named profiler ranges (:mod:`tekfac.profiling`) in a profiled
  warm-up of ``2·COV`` steps that precedes the timed steps: every phase from its last ``COV``
  steps, the eigendecomposition from its first step (amortised over ``EIGEN`` steps);
* ``floor_ratio``: the predicted ratio to SGD if every step did only the arithmetic the method
  cannot avoid — SGD's ``6·N·T·d_in·d_out`` FLOPs per layer (forward, input and weight
  gradients; the first layer has no input gradient) plus rotating the gradient into and out of
  the eigenbasis (``4·d_in·d_out·(d_in+d_out)``) and the amortised statistics (the sampled
  backward's input gradients, the input factor by the cheaper of unfolding and spatial
  correlation), eigendecomposition (``9·d³``) and scaling work (counted below, per layer);
* ``peak_mb``: the peak memory of live tensors in a separate short run (model, batch and
  optimizer state included; see :func:`peak_memory_mb`).

With ``--step-rule quadratic`` the Kronecker methods take the quadratic-model step
(docs/design.md §4.7: the graph is kept for two more backward passes, in the ``quadratic``
column; no KL clip, rate multiplier 1).

With ``--compile`` every optimizer also runs on the ``torch.compile``-d model (built on the
compiled model; the profiled warm-up holds the compilations, so the timed steps do not), in
the same rounds as the eager one: rows ``<optimizer>+compile`` (their ×SGD against the eager
SGD), and per optimizer the median over rounds of the compiled step over the eager step of
the same round.

On CPU, subnormal floats are flushed to zero, as ``tekfac bench`` does.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from tekfac.bench.data import INPUT_SHAPES, DataError, load_dataset
from tekfac.bench.memory import peak_allocated_mb
from tekfac.bench.optimizers import OPTIMIZERS, SECOND_ORDER, backward, make_optimizer
from tekfac.bench.tasks import TASKS
from tekfac.layers import is_supported, make_layer
from tekfac.profiling import STAGES

COV, EIGEN = 10, 100
#: set by ``--damping-adaptive``: the Kronecker methods adapt their damping (docs/design.md §3)
DAMPING_ADAPTIVE = False
#: set by ``--step-rule``: the Kronecker methods' step rule (docs/design.md §4.7)
STEP_RULE = "fixed"
#: whether the next measurement compiles its model (``--compile`` alternates it)
COMPILE = False
BATCH = 128
PHASES = ("forward", "backward", "statistics", "eigendecomposition", "scaling",
          "preconditioning", "quadratic", "parameter step", "damping")
#: the library's stages timed inside the benchmark's backward and step ranges ("update", the
#: KL clip and momentum step, belongs to the parameter step)
INNER = tuple(s for s in STAGES if s != "update")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def layer_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(T, d_in, d_out, F_in)`` of every Linear/Conv layer in forward order: ``d_in`` with the
    bias column, ``F_in`` the FLOPs per example of its input factor (by unfolding or, for a
    convolution where cheaper, by spatial correlation: see :mod:`tekfac.patch_moments`)."""
    shapes, hooks = [], []
    for m in model.modules():
        if is_supported(m):
            def hook(mod, args, out, m=m):
                t = out[0].numel() // out.shape[1] if out.dim() > 2 else 1
                layer = make_layer("", m)
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
        return (torch.rand(BATCH, *INPUT_SHAPES[dataset], generator=gen),
                torch.randint(0, 10, (BATCH,), generator=gen))


def build(task_name: str, optimizer: str, device: str, batch: tuple[torch.Tensor, torch.Tensor],
          **options: object):
    """The task, its model, a copy of ``batch`` on ``device`` and the optimizer (default
    settings, updated by ``options``; adaptive damping for the Kronecker methods when
    ``DAMPING_ADAPTIVE`` is set)."""
    task = TASKS[task_name]
    torch.manual_seed(0)
    model = task.build().to(device)
    if COMPILE:
        model = torch.compile(model)
    x, y = (t.to(device, copy=True) for t in batch)
    hparams = {"lr": 1e-3, "damping": 0.1, "damping_adaptive": DAMPING_ADAPTIVE}
    if STEP_RULE == "quadratic" and optimizer in SECOND_ORDER:
        hparams["lr"] = 1.0
        options = {"step_rule": "quadratic", "kl_clip": None, **options}
    opt = make_optimizer(optimizer, model, hparams, task.loss, task.weight_decay, **options)
    return task, model, x, y, opt


def train_step(task, model, x, y, opt) -> None:
    """One training step, its forward, backward and optimizer step in named ranges. With
    adaptive damping the step takes them as a closure, and evaluates it again after the
    parameter update (under ``no_grad``, unnamed here): that forward is timed in the
    library's ``damping`` stage."""
    def closure() -> torch.Tensor:
        probe = not torch.is_grad_enabled()
        with nullcontext() if probe else record_function("bench.forward"):
            out = task.forward(model, task.inputs(x))
            loss = task.loss_fn(out, task.targets(x, y))
        opt.zero_grad(set_to_none=True)
        with nullcontext() if probe else record_function("bench.backward"):
            backward(opt, loss, out)  # the MC statistics are computed in here
        return loss

    if getattr(opt, "damping_adaptation", None) is not None:
        with record_function("bench.step"):
            opt.step(closure)
        return
    closure()
    with record_function("bench.step"):
        opt.step()


def breakdown(events: list, steps: int) -> tuple[dict[str, float], float]:
    """Milliseconds per step of each phase from the profiler ``events`` of ``steps`` steps run
    by :func:`train_step`, and the total of the eigendecomposition ranges: the library's
    stages by their ranges; the backward and the parameter step by the benchmark's ranges
    less the stages inside them."""
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in events
             if e.name.startswith(("bench.", "tekfac."))]
    total = {p: 0.0 for p in PHASES}
    for name, start, end in spans:
        if name.startswith("tekfac.") and name[7:] in INNER:
            total[name[7:]] += end - start
    outer = {"bench.forward": "forward", "bench.backward": "backward",
             "bench.step": "parameter step"}
    timed = [(s, e) for n, s, e in spans if n in outer or (n.startswith("tekfac.")
                                                           and n[7:] in INNER)]
    for name, start, end in spans:
        if name in outer:  # less the outermost timed ranges inside it (a closure's, a stage's)
            inner = [(s, e) for s, e in timed if start <= s and e <= end and (s, e) != (start, end)]
            inside = sum(e - s for s, e in inner
                         if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in inner))
            total[outer[name]] += end - start - inside
    eigen_ms = 1e-3 * total.pop("eigendecomposition")
    return {p: 1e-3 * v / steps for p, v in total.items()}, eigen_ms


def measure(task_name: str, optimizer: str, steps: int, device: str, memory: bool = True,
            queue=None) -> dict:
    """Run ``2·COV`` profiled warm-up steps (for the breakdown), then time ``steps`` steps on
    one batch; then, if ``memory``, measure the peak memory (:func:`peak_memory_mb`)."""
    batch = sample_batch(TASKS[task_name].dataset)
    task, model, x, y, opt = build(task_name, optimizer, device, batch)
    torch.linalg.eigh(torch.eye(8, device=device))  # load the solver before the profiled run
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2 * COV):  # the first step holds the first eigendecomposition
            train_step(task, model, x, y, opt)
        sync(device)
    events = [e for e in prof.events() if e.name.startswith(("bench.", "tekfac."))]
    _, eigen_ms = breakdown(_step_events(events, 0, 1), 1)
    phases, _ = breakdown(_step_events(events, COV, 2 * COV), COV)
    step_times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        train_step(task, model, x, y, opt)
        sync(device)
        step_times.append(time.perf_counter() - start)
    blocks = [statistics.fmean(step_times[i:i + COV]) for i in range(0, steps - COV + 1, COV)]
    shapes = layer_shapes(model, x[:2])
    result = {
        "floor_ratio": floor_flops(optimizer, shapes) / floor_flops("sgd", shapes),
        "step_ms": 1e3 * statistics.median(blocks) + eigen_ms / EIGEN,
        "breakdown_ms": {**phases, "eigendecomposition": eigen_ms / EIGEN},
    }
    del model, opt  # not counted by the memory run
    if memory:
        result["peak_mb"] = peak_memory_mb(task_name, optimizer, device, batch)
    if queue is not None:
        queue.put(result)
    return result


def _step_events(events: list, first: int, last: int) -> list:
    """The ranges of steps ``first`` to ``last - 1`` (each step opens one ``bench.forward``)."""
    starts = sorted(e.time_range.start for e in events if e.name == "bench.forward")
    low = starts[first]
    high = starts[last] if last < len(starts) else float("inf")
    return [e for e in events if low <= e.time_range.start < high]


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
    gc.collect()  # the timed run sits in reference cycles (hooks): free it

    def train() -> None:
        task, model, x, y, opt = build(task_name, optimizer, device, batch, **options)
        for _ in range(5):
            train_step(task, model, x, y, opt)

    return peak_allocated_mb(train, device)


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
    parser.add_argument("--damping-adaptive", action="store_true",
                        help="the Kronecker methods adapt their damping (every 5 steps: one "
                             "more forward, in the 'damping' column)")
    parser.add_argument("--step-rule", choices=["fixed", "quadratic"], default="fixed",
                        help="the Kronecker methods' step rule (quadratic: two more backward "
                             "passes per step, in the 'quadratic' column)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every optimizer on the torch.compile-d model")
    args = parser.parse_args()
    global DAMPING_ADAPTIVE, STEP_RULE, COMPILE
    DAMPING_ADAPTIVE, STEP_RULE = args.damping_adaptive, args.step_rule
    variants = [False, True] if args.compile else [False]
    steps = args.steps or (10 if args.quick else 100)
    steps = max(COV, steps - steps % COV)
    rounds = max(1, args.rounds or (1 if args.quick else 3))
    if args.device == "cpu":  # as `tekfac bench` does: float32 subnormals are slow on CPUs
        torch.set_flush_denormal(True)
    report: dict[str, dict[str, dict]] = {}
    for task_name in args.tasks:
        runs: dict[str, list[dict]] = {}
        for k in range(rounds):
            for optimizer in args.optimizers:
                for compiled in variants:
                    COMPILE = compiled  # read by build(), also in the forked child
                    name = f"{optimizer}+compile" if compiled else optimizer
                    runs.setdefault(name, []).append(measure_isolated(
                        task_name, optimizer, steps, args.device, memory=k == 0))
        COMPILE = False
        rows = {optimizer: combine(results, runs.get("sgd")) for optimizer, results in runs.items()}
        for optimizer in args.optimizers if args.compile else ():
            rows[f"{optimizer}+compile"]["compile_ratio"] = statistics.median(
                c["step_ms"] / e["step_ms"]
                for c, e in zip(runs[f"{optimizer}+compile"], runs[optimizer]))
        report[task_name] = rows
        if not args.json:
            print_table(task_name, rows, steps, rounds, args.device)
    if args.json:
        keys = ("step_ms", "ratio_vs_sgd", "floor_ratio", "peak_mb", "compile_ratio")
        print(json.dumps({t: {o: {k: r[k] for k in keys if k in r} for o, r in rows.items()}
                          for t, rows in report.items()}))


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
    compiled = {name: r["compile_ratio"] for name, r in rows.items() if "compile_ratio" in r}
    if compiled:
        print("compiled ÷ eager step (median of same-round ratios): "
              + ", ".join(f"{name[:-8]} {ratio:.2f}" for name, ratio in compiled.items()))


if __name__ == "__main__":
    main()
