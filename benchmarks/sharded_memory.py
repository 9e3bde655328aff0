"""Per-rank optimizer-state memory and bytes communicated per step: DDP and FSDP2, 2 and 4 ranks.

    python benchmarks/sharded_memory.py [--ranks 2 4] [--steps 10] [--method tekfac]
                                        [--width 256] [--out results.json]

The model is the text-gpt task's transformer widened (``tiny_gpt(width=256)``: its MLP
layers' factors, 257² + 1024² entries each, dominate the parameters), trained on random
tokens (8 windows of 64 per rank) with the MC Fisher, statistics and re-fitted scaling every
step, bases every 5 steps. Each configuration is DDP or FSDP2 (``fully_shard`` on every
block and the root) with ``distributed_mode`` ``replicated`` (every rank keeps every layer's
curvature) or ``owner`` (each layer's on one rank; FSDP2's default). Per rank it reports:

* ``curvature MB``: the bytes of the tracked layers' states this rank keeps (factors,
  bases, eigenvalues, scalings), after the steps (the state only grows to that size);
  ``balance`` the largest rank's over the mean of all ranks' (1.0: an even split);
* ``momentum MB``: this rank's momentum buffers (a shard of each under FSDP2);
* ``tekfac KB/step``: what tekfac's own collectives put on the wire per step, measured
  (``Communicator.bytes_sent``: statistics reductions, shared bases and directions);
* ``gather KB/step``: under FSDP2, the all-gather of the tracked layers' gradients
  (``DTensor.full_tensor``), computed from the shapes as the bytes this rank receives,
  ``|∇|·(S−1)/S``, with ``S`` the shard count;
* ``engine KB/step``: what DDP or FSDP2 itself moves per step per rank, computed for ring
  collectives: DDP's all-reduce of every gradient ``2|W|(R−1)/R``; FSDP2's two all-gathers
  of the parameters (forward, backward) and reduce-scatter of the gradients ``3|W|(S−1)/S``;
* ``step ms``: the median step time over the measured steps (all ranks share this
  machine's cores, so compare the configurations of one run, not machines).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tekfac
from tekfac.bench.models import tiny_gpt
from tekfac.sharding import is_sharded, local

CONFIGS = [("ddp", "replicated"), ("ddp", "owner"), ("fsdp2", "replicated"), ("fsdp2", "owner")]
WARMUP = 3


def _nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def _build(engine: str, width: int) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_gpt(width=width)
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 98, (args.steps + WARMUP, 8, 65), generator=gen)
    rows = []
    for engine, mode in CONFIGS:
        model = _build(engine, args.width)
        inner = model.module if engine == "ddp" else model
        attention = [m for m in inner.modules() if isinstance(m, nn.MultiheadAttention)]
        opt = tekfac.KroneckerOptimizer(model, args.method, lr=1e-3, damping=1e-3,
                                        exclude=attention, distributed_mode=mode,
                                        cov_update_freq=1, scale_update_freq=1,
                                        eigen_update_freq=5)
        pre = opt.preconditioner
        times = []
        for i, window in enumerate(tokens):
            if i == WARMUP:
                pre.comm.bytes_sent = 0
            start = time.perf_counter()
            logits = model(window[:, :-1])
            flat = logits.reshape(-1, logits.shape[-1])
            opt.zero_grad()
            opt.backward(F.cross_entropy(flat, window[:, 1:].reshape(-1)), flat)
            opt.step()
            times.append(time.perf_counter() - start)
        params = list(inner.parameters())
        total = sum(p.numel() * p.element_size() for p in params)  # global shapes
        tracked = sum(p.numel() * p.element_size() for la in pre.layers for p in la.params)
        shards = world if any(is_sharded(p) for p in params) else 1
        gather = tracked * (shards - 1) / shards if shards > 1 else 0.0
        engine_bytes = (2 * total * (world - 1) / world if engine == "ddp"
                        else 3 * total * (shards - 1) / shards)
        curvature = sum(_nbytes(vars(state).values()) for state in pre.states.values())
        momentum = _nbytes(s.get("momentum_buffer") for s in opt.state.values())
        rows.append({"engine": engine, "mode": mode, "rank": rank, "world": world,
                     "curvature_bytes": curvature, "momentum_bytes": momentum,
                     "tekfac_bytes_per_step": pre.comm.bytes_sent / args.steps,
                     "gather_bytes_per_step": gather, "engine_bytes_per_step": engine_bytes,
                     "step_s": statistics.median(times[WARMUP:])})
        del opt, model
    queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = [row for _ in procs for row in queue.get()]
    for p in procs:
        p.join()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5} {'engine':<6} {'mode':<10} {'curvature MB':>12} {'balance':>7} "
             f"{'momentum MB':>11} {'tekfac KB/step':>14} {'gather KB/step':>14} "
             f"{'engine KB/step':>14} {'step ms':>8}"]
    keys = sorted({(r["world"], r["engine"], r["mode"]) for r in rows},
                  key=lambda k: (k[0], CONFIGS.index(k[1:])))
    for world, engine, mode in keys:
        group = [r for r in rows if (r["world"], r["engine"], r["mode"]) == (world, engine, mode)]
        curv = [r["curvature_bytes"] for r in group]

        def mean_kb(key: str, group: list[dict] = group) -> float:
            return statistics.mean(r[key] for r in group) / 1e3

        momentum = max(r["momentum_bytes"] for r in group) / 1e6
        step_ms = statistics.median(r["step_s"] for r in group) * 1e3
        lines.append(
            f"{world:>5} {engine:<6} {mode:<10} {max(curv) / 1e6:>12.2f} "
            f"{max(curv) / statistics.mean(curv):>7.2f} {momentum:>11.2f} "
            f"{mean_kb('tekfac_bytes_per_step'):>14.0f} {mean_kb('gather_bytes_per_step'):>14.0f} "
            f"{mean_kb('engine_bytes_per_step'):>14.0f} {step_ms:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--method", default="tekfac", choices=sorted(tekfac.METHODS))
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = [row for world in args.ranks for row in run(world, args)]
    print(f"{args.method}, tiny_gpt(width={args.width}), {args.steps} steps after {WARMUP}; "
          "curvature and momentum: the largest rank's")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
