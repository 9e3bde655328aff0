"""One training run: a task, an optimizer, hyper-parameters, a seed, a budget.

Each run yields one record per evaluation (``evals_per_epoch`` per epoch, plus step 0, the
untrained model): ``task, optimizer, seed, epoch, step, train_loss, test_metric, wall_time_s,
step_time_ms, diverged, last``. ``epoch`` is ``step / steps_per_epoch`` (fractional between
epochs); ``test_metric`` is the task's metric on the split's evaluation set (the validation
split while tuning, the test set in the final runs); ``train_loss`` is the mean minibatch
loss since the previous evaluation; ``wall_time_s`` the cumulative training time (forward,
backward, optimizer step; evaluation, logging and memory probe excluded); ``step_time_ms``
the median step time since the previous evaluation; ``last`` marks the run's final record.
The Kronecker methods' records also hold ``kl_clip_factors``, the KL-clip factor ν of every
step since the previous record (:class:`KlClipLog`), and with adaptive damping ``damping``, its
value at the record (the second evaluation of the batch is timed with the step); with
``measure_memory`` the first record
of a single-process run holds ``peak_memory_mb`` (:func:`peak_memory_mb`). A run whose loss
becomes non-finite stops and is marked ``diverged``. The learning rate follows
:func:`warmup_cosine_schedule` over the whole run, except under the quadratic step rule
(docs/design.md §4.7), which chooses its own rate: its multiplier ``lr`` stays constant.

Inside an initialised process group (``tekfac bench --nproc N`` or ``torchrun``) the model is
wrapped in ``DistributedDataParallel``, each rank trains on its share of every global
minibatch (``--batch-size`` is the global batch, split evenly), the reported training loss is
the mean over ranks, and rank 0 alone evaluates and records.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from tekfac import KroneckerOptimizer
from tekfac.bench.data import iterate_minibatches
from tekfac.bench.memory import peak_allocated_mb
from tekfac.bench.optimizers import SECOND_ORDER, make_optimizer, take_step, warmup_cosine_schedule
from tekfac.bench.tasks import Task


@dataclass(frozen=True)
class Split:
    """Training images/labels and the images/labels the metric is measured on."""

    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor


def run(task: Task, split: Split, optimizer: str, hparams: dict[str, float], seed: int,
        epochs: int, batch_size: int = 128, device: str = "cpu", quiet: bool = False,
        emit: Callable[[dict], None] | None = None, *, evals_per_epoch: int = 1,
        warmup_fraction: float = 0.0, measure_memory: bool = False, steps: int | None = None,
        eval_steps: Collection[int] | None = None,
        stop_when: Callable[[dict], bool] | None = None) -> list[dict]:
    """Train ``task``'s model from scratch and return its records, one per evaluation.

    The budget is ``epochs`` passes over the training examples, or ``steps`` steps if given
    (passes follow one another, the last one cut short). The evaluation points are the
    untrained model (step 0) and the global steps ``round(k · S / evals_per_epoch)``,
    ``k = 1 .. epochs · evals_per_epoch``, for ``S`` steps per epoch, or the ``eval_steps``
    within the budget if given; the end of training is always one. With ``stop_when`` the
    run ends at the first evaluation whose record it returns true for (asked on rank 0, the
    answer broadcast), which that record marks ``last``: e.g. once the target is reached, when
    the rest of the budget would not change the steps to target; the learning-rate schedule
    still spans the whole budget. ``emit`` (if given) receives each record as soon as it
    exists (for ``runs.jsonl``). ``measure_memory`` adds
    ``peak_memory_mb`` (:func:`peak_memory_mb`, measured before training, untimed) to the
    first record.
    """
    rank, world = _world()
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes")
    if evals_per_epoch < 1:
        raise ValueError(f"evals_per_epoch must be at least 1, got {evals_per_epoch}")
    steps_per_epoch = len(split.train_x) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {len(split.train_x)} training "
                         "examples")
    total = epochs * steps_per_epoch if steps is None else steps
    if total < 1:
        raise ValueError(f"the budget must be at least one step, got {total}")
    if eval_steps is None:
        evals = {round(k * steps_per_epoch / evals_per_epoch)
                 for k in range(1, epochs * evals_per_epoch + 1)} - {0}
    else:
        evals = {s for s in eval_steps if 0 < s < total} | {total}
    memory = None
    if measure_memory and world == 1:  # the probe's optimizer would join the group's collectives
        probe = (split.train_x[:batch_size], split.train_y[:batch_size])
        memory = peak_memory_mb(task, optimizer, hparams, probe, device)
    torch.manual_seed(seed)
    model = task.build().to(device)
    net = model if world == 1 else nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(optimizer, net, hparams, task.loss, task.weight_decay)
    kl = KlClipLog.attach(opt)
    schedule = None if getattr(opt, "step_rule", "fixed") == "quadratic" \
        else warmup_cosine_schedule(opt, total, warmup_fraction)
    train_x, train_y = split.train_x.to(device), split.train_y.to(device)
    shuffle = torch.Generator().manual_seed(seed)
    augment = torch.Generator().manual_seed(seed + 1 + rank)
    quiet = quiet or rank > 0
    base = dict(task=task.name, optimizer=optimizer, seed=seed)
    first = dict(base, epoch=0, step=0, train_loss=None, wall_time_s=0.0, step_time_ms=None,
                 test_metric=_evaluate(task, model, split, rank), diverged=False,
                 last=False)
    if memory is not None:
        first["peak_memory_mb"] = memory
    records = [first]
    _emit(records[-1], emit, rank)
    wall, step, losses, times = 0.0, 0, [], []
    for epoch in range(1, math.ceil(total / steps_per_epoch) + 1):
        bar = _progress(steps_per_epoch, f"{task.name} {optimizer} s{seed} e{epoch}", quiet)
        if world == 1:
            batches = iterate_minibatches(train_x, train_y, batch_size, shuffle)
        else:
            batches = _shard(train_x, train_y, batch_size // world, seed, epoch, rank, world)
        for xb, yb in batches:
            start = time.perf_counter()
            loss = _train_step(task, net, opt, xb, yb, augment)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            step += 1
            if kl is not None:
                kl.record()  # untimed
            if schedule is not None:
                schedule.step()
            losses.append(loss)
            if bar is not None:
                bar.update()
                if len(losses) % 20 == 0:
                    bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.4f}")
            stop = world == 1 and not math.isfinite(loss)
            if step not in evals and not stop:
                continue
            wall += sum(times)
            train_loss = _mean_over_ranks(statistics.fmean(losses), world)
            diverged = not math.isfinite(train_loss)
            metric = math.nan if diverged else _evaluate(task, model, split, rank)
            record = dict(base, epoch=step / steps_per_epoch, step=step, train_loss=train_loss,
                          wall_time_s=wall, step_time_ms=1e3 * statistics.median(times),
                          test_metric=metric, diverged=diverged,
                          last=diverged or step == total)
            if kl is not None:
                record["kl_clip_factors"] = kl.take()
            if getattr(opt, "damping_adaptation", None) is not None:
                record["damping"] = opt.damping
            if stop_when is not None and not record["last"]:
                record["last"] = _on_rank_zero(stop_when, record, rank, world)
            records.append(record)
            if bar is None and rank == 0:
                print(f"{task.name} {optimizer} seed {seed} step {step} (epoch "
                      f"{record['epoch']:.2f}): train loss {train_loss:.4f}, {task.metric} "
                      f"{metric:.4f}, {wall:.1f}s", flush=True)
            elif bar is not None:
                bar.set_postfix(loss=f"{train_loss:.4f}", **{task.metric: f"{metric:.4f}"})
            _emit(record, emit, rank)
            losses, times = [], []
            if record["last"]:
                break
        if bar is not None:
            bar.close()
        if records[-1]["last"]:
            break
    return records


class KlClipLog:
    """The KL-clip factor ``ν`` of each step of a Kronecker optimizer, read from its
    ``kl_factor`` after the (timed) step. 1.0 means the step was not clipped; NaN marks a step
    that set no new ``ν`` (skipped for a non-finite gradient, or without tracked gradients)."""

    def __init__(self, opt: KroneckerOptimizer):
        self.opt, self.values, self._last = opt, [], None

    @classmethod
    def attach(cls, opt: torch.optim.Optimizer) -> KlClipLog | None:
        """A log for a KL-clipped Kronecker optimizer, None for any other."""
        if isinstance(opt, KroneckerOptimizer) and opt.param_groups[0]["kl_clip"] is not None:
            return cls(opt)
        return None

    def record(self) -> None:
        """Append the ν of the step just taken."""
        nu = self.opt.kl_factor
        self.values.append(math.nan if nu is None or nu is self._last else float(nu))
        self._last = nu

    def take(self) -> list[float]:
        """The values since the last call."""
        values, self.values = self.values, []
        return values


def peak_memory_mb(task: Task, optimizer: str, hparams: dict[str, float],
                   batch: tuple[Tensor, Tensor], device: str) -> float:
    """Peak MiB of live tensors (model, one batch, optimizer state, activations) over 5
    training steps of a fresh model on ``batch``; for the Kronecker methods with statistics
    every 2 and eigendecompositions every 4 steps, so that every kind of step is included
    (memory does not depend on the frequencies). On CUDA ``max_memory_allocated`` above the
    memory in use before; on CPU the maximum "Total Allocated" of the profiler's memory
    events (``benchmarks/step_time.py``'s method). Runs under ``torch.random.fork_rng``, so
    the training run that follows is unchanged; it is not timed."""
    options = dict(cov_update_freq=2, scale_update_freq=2, eigen_update_freq=4) \
        if optimizer in SECOND_ORDER else {}
    gc.collect()

    def train() -> None:
        model = task.build().to(device)
        opt = make_optimizer(optimizer, model, hparams, task.loss, task.weight_decay,
                             **options)
        x, y = (t.to(device, copy=True) for t in batch)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            _train_step(task, model, opt, x, y, gen)

    with torch.random.fork_rng(devices=[]):
        return peak_allocated_mb(train, device)


def _train_step(task: Task, model, opt, xb: Tensor, yb: Tensor,
                generator: torch.Generator) -> float:
    targets = task.targets(xb, yb)
    inputs = task.inputs(xb, generator)  # drawn once: a second evaluation sees the same batch

    def compute() -> tuple[Tensor, Tensor]:
        outputs = task.forward(model, inputs)  # what the loss takes, exactly
        return task.loss_fn(outputs, targets), outputs

    return take_step(opt, compute).item()


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm  # optional dependency of the benchmark

    return tqdm(total=total, desc=desc, leave=True, file=sys.stderr, dynamic_ncols=True)


def _emit(record: dict, emit: Callable[[dict], None] | None, rank: int) -> None:
    if emit is not None and rank == 0:
        emit(record)


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _evaluate(task: Task, model: nn.Module, split: Split, rank: int) -> float:
    """The test metric, computed on rank 0 only (NaN elsewhere: only rank 0 records)."""
    return task.evaluate(model, split.eval_x, split.eval_y) if rank == 0 else math.nan


def _on_rank_zero(question: Callable[[dict], bool], record: dict, rank: int,
                  world: int) -> bool:
    """``question(record)`` asked on rank 0 (whose records hold the metric), its answer
    broadcast to every rank."""
    answer = question(record) if rank == 0 else False
    if world == 1:
        return answer
    flag = torch.tensor([float(answer)])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def _shard(x: Tensor, y: Tensor, local_batch: int, seed: int, epoch: int, rank: int,
           world: int) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's minibatches of one epoch: a ``DistributedSampler`` (shuffled with the
    run's seed and the epoch, the same on every rank) split into ``local_batch`` pieces, so
    that the global batch is ``local_batch · world``."""
    sampler = DistributedSampler(range(len(x)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), device=x.device)
    for start in range(0, len(idx) - local_batch + 1, local_batch):
        part = idx[start:start + local_batch]
        yield x[part], y[part]
