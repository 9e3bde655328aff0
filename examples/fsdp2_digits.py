"""A small CNN on scikit-learn's digits, sharded by FSDP2, trained by TEKFAC, checkpointed with
``torch.distributed.checkpoint`` halfway and resumed in a fresh model and optimizer.

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_digits.py --steps 20
    torchrun --standalone --nproc-per-node 4 examples/fsdp2_digits.py --hsdp   # a 2 x 2 mesh

Build the optimizer after ``fully_shard``: it then keeps each layer's curvature on one rank
(``distributed_mode="auto"``), and its state dict holds each rank's layers, which DCP saves
and loads (also on another number of ranks). Each rank trains on its share of every batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import tekfac
from tekfac.bench.data import load_dataset


def sharded_model(mesh) -> tuple[nn.Module, tekfac.TEKFAC]:
    """The CNN, each layer and the root sharded over ``mesh``, and its optimizer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    for layer in (net[0], net[4], net[6]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net, tekfac.TEKFAC(net, lr=0.05, damping=1e-2, eigen_update_freq=5, seed=0)


def train(net: nn.Module, opt: tekfac.TEKFAC, batches) -> list[float]:
    losses = []
    for x, y in batches:
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        opt.backward(loss, logits)
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hsdp", action="store_true", help="a (2, ranks/2) mesh")
    parser.add_argument("--checkpoint", help="DCP directory (default: a temporary one)")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape, names = ((2, world // 2), ("replicate", "shard")) if args.hsdp else ((world,), None)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    data = load_dataset("digits")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):  # a global batch of 32 per step, each rank its share
        index = torch.randint(0, len(data.train_y), (32,), generator=gen).chunk(world)[rank]
        batches.append((data.train_x[index], data.train_y[index]))
    half = args.steps // 2
    net, opt = sharded_model(mesh)
    losses = train(net, opt, batches[:half])
    path = (args.checkpoint or tempfile.mkdtemp()) if rank == 0 else None
    path = [path]
    dist.broadcast_object_list(path)  # every rank writes its shards into one directory
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
             checkpoint_id=path[0])
    del net, opt  # resume as a new process would: a fresh model and optimizer
    net, opt = sharded_model(mesh)
    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=path[0])
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])
    losses += train(net, opt, batches[half:])
    if rank == 0:
        print(f"{world} ranks, mesh {shape}; resumed at step {half} from {path[0]}")
        print("losses: " + " ".join(f"{v:.3f}" for v in losses))
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
