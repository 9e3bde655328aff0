"""Per-step time and bytes communicated per step, 1 and 2 data-parallel processes (gloo, CPU).

    python benchmarks/distributed_step.py [--steps 100] [--task fmnist-cnn]

Each configuration trains the task's model on synthetic inputs with a global batch of 128
(64 per rank with 2 processes) and reports the median over blocks of 10 steps (one statistics
step each) of the block's mean step time, the tekfac statistics/eigenbasis bytes each rank put
into collectives per step (``Communicator.bytes_sent``), and DDP's gradient all-reduce payload
(the parameters' bytes, every step), and the time per step that rank 0 blocks waiting for
the statistics all-reduces (``Communicator.wait_s``, the time spent in ``PendingMean.wait``;
with the MC Fisher they are launched in ``backward()`` and overlap ``loss.backward()``).
Eigendecompositions run every 100 steps as by default, so ``--steps`` ≥ 100 includes one
refresh per 100 steps. Both process counts share this machine's cores, so the 2-process time
shows overhead, not speed-up, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tekfac.bench.data import INPUT_SHAPES
from tekfac.bench.optimizers import backward, make_optimizer
from tekfac.bench.tasks import TASKS

CONFIGS = [("sgd", "replicated"), ("kfac", "replicated"), ("kfac", "owner"),
           ("tekfac", "replicated")]


def worker(rank: int, world: int, port: int, task_name: str, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    task = TASKS[task_name]
    out = {}
    for optimizer, mode in CONFIGS:
        torch.manual_seed(0)
        model = task.build()
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        options = {"distributed_mode": mode} if optimizer != "sgd" else {}
        opt = make_optimizer(optimizer, net, {"lr": 1e-3, "damping": 0.1}, task.loss,
                             task.weight_decay, **options)
        gen = torch.Generator().manual_seed(rank)
        local = 128 // world
        x = torch.rand(local, *INPUT_SHAPES[task.dataset], generator=gen)
        y = torch.randint(0, 10, (local,), generator=gen)
        times = []
        comm = getattr(getattr(opt, "preconditioner", None), "comm", None)
        for i in range(10 + steps):
            if i == 10 and comm is not None:
                comm.bytes_sent, comm.wait_s = 0, 0.0
            start = time.perf_counter()
            outputs = net(task.inputs(x))
            loss = task.loss_fn(outputs, task.targets(x, y))
            opt.zero_grad(set_to_none=True)
            backward(opt, loss, outputs)
            opt.step()
            if i >= 10:
                times.append(time.perf_counter() - start)
        blocks = [statistics.fmean(times[i:i + 10]) for i in range(0, len(times) - 9, 10)]
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        out[f"{optimizer}/{mode}"] = dict(
            step_ms=1e3 * statistics.median(blocks),
            tekfac_bytes_per_step=(comm.bytes_sent / steps) if comm is not None else 0.0,
            ddp_bytes_per_step=grad_bytes if world > 1 else 0,
            wait_ms_per_step=(1e3 * comm.wait_s / steps) if comm is not None else 0.0)
        if hasattr(opt, "preconditioner"):
            opt.preconditioner.remove_hooks()
    if rank == 0:
        queue.put(out)
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, task: str, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(r, world, port, task, steps, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--task", default="fmnist-cnn",
                        choices=[t for t in TASKS if TASKS[t].dataset != "digits"])
    args = parser.parse_args()
    results = {world: measure(world, args.task, args.steps) for world in (1, 2)}
    print(f"{args.task}: global batch 128, {args.steps} measured steps, gloo on "
          f"{os.cpu_count()} CPU cores")
    print(f"{'optimizer/mode':>20} {'procs':>5} {'step ms':>9} {'tekfac kB/step':>15} "
          f"{'DDP grads kB/step':>18} {'stats wait ms':>14}")
    for name in results[1]:
        for world, rows in results.items():
            r = rows[name]
            print(f"{name:>20} {world:>5} {r['step_ms']:>9.1f} "
                  f"{r['tekfac_bytes_per_step'] / 1e3:>15.1f} "
                  f"{r['ddp_bytes_per_step'] / 1e3:>18.1f} {r['wait_ms_per_step']:>14.2f}")


if __name__ == "__main__":
    main()
