"""One training run: a task, an optimizer, hyper-parameters, a seed, an epoch budget.

Each run yields one record per epoch (epoch 0 is the untrained model):
``task, optimizer, seed, epoch, train_loss, test_metric, wall_time_s, step_time_ms``.
``train_loss`` is the mean minibatch loss over the epoch, ``wall_time_s`` the cumulative
training time (evaluation excluded), ``step_time_ms`` the median time of the epoch's steps
(forward, backward, optimizer step). A run whose loss becomes non-finite stops and is marked
``diverged``.

Inside an initialised process group (``tekfac bench --nproc N`` or ``torchrun``) the model is
wrapped in ``DistributedDataParallel``, each rank trains on its share of every global
minibatch (``--batch-size`` is the global batch, split evenly), the reported training loss is
the mean over ranks, and rank 0 alone evaluates and records.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from tekfac.bench.data import iterate_minibatches
from tekfac.bench.optimizers import backward, cosine_schedule, make_optimizer
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
        emit: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``task``'s model from scratch and return its per-epoch records.

    ``emit`` (if given) receives each record as soon as it exists (for ``runs.jsonl``).
    """
    rank, world = _world()
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes")
    torch.manual_seed(seed)
    model = task.build().to(device)
    net = model if world == 1 else nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(optimizer, net, hparams, task.loss, task.weight_decay)
    steps_per_epoch = len(split.train_x) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {len(split.train_x)} training "
                         "examples")
    schedule = cosine_schedule(opt, epochs * steps_per_epoch)
    train_x, train_y = split.train_x.to(device), split.train_y.to(device)
    shuffle = torch.Generator().manual_seed(seed)
    augment = torch.Generator().manual_seed(seed + 1 + rank)
    quiet = quiet or rank > 0
    base = dict(task=task.name, optimizer=optimizer, seed=seed)
    records = [dict(base, epoch=0, train_loss=None, wall_time_s=0.0, step_time_ms=None,
                    test_metric=_evaluate(task, model, split, rank), diverged=False)]
    _emit(records[-1], emit, rank)
    wall = 0.0
    for epoch in range(1, epochs + 1):
        losses, times = [], []
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
            schedule.step()
            losses.append(loss)
            if bar is not None:
                bar.update()
                if len(losses) % 20 == 0:
                    bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.4f}")
            if world == 1 and not math.isfinite(loss):
                break
        wall += sum(times)
        train_loss = _mean_over_ranks(statistics.fmean(losses), world)
        diverged = not math.isfinite(train_loss)
        metric = math.nan if diverged else _evaluate(task, model, split, rank)
        records.append(dict(base, epoch=epoch, train_loss=train_loss, wall_time_s=wall,
                            step_time_ms=1e3 * statistics.median(times), test_metric=metric,
                            diverged=diverged))
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.4f}", **{task.metric: f"{metric:.4f}"})
            bar.close()
        elif rank == 0:
            print(f"{task.name} {optimizer} seed {seed} epoch {epoch}: train loss "
                  f"{train_loss:.4f}, {task.metric} {metric:.4f}, {wall:.1f}s", flush=True)
        _emit(records[-1], emit, rank)
        if diverged:
            break
    return records


def _train_step(task: Task, model, opt, xb: Tensor, yb: Tensor,
                generator: torch.Generator) -> float:
    targets = task.targets(xb, yb)
    outputs = task.forward(model, task.inputs(xb, generator))  # what the loss takes, exactly
    loss = task.loss_fn(outputs, targets)
    opt.zero_grad(set_to_none=True)
    backward(opt, loss, outputs)
    opt.step()
    return loss.item()


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
