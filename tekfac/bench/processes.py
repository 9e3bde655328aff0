"""The processes a ``tekfac`` command runs in: data-parallel ranks and their process group.

``tekfac bench --nproc N`` starts N processes on this machine with :func:`spawn`, each one rank
of a process group (gloo on CPU, NCCL on CUDA) that runs the same command; under ``torchrun``
the processes already exist and the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
describes the group. :func:`session` wraps the work of one process: it joins that group if
there is one, flushes subnormal floats to zero on CPU, and leaves the group cleanly at the end.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def spawn(entry: Callable[[list[str]], int], argv: list[str], nproc: int) -> None:
    """Runs ``entry(argv)`` in ``nproc`` new processes on this machine, as ranks 0..nproc-1.

    Each process gets the environment of one rank of a process group on a free local port and
    an equal share of the CPU threads; ``entry`` (a module-level function, as it is pickled)
    joins the group through :func:`session`.

    Args:
        entry: The command's entry point; returns its exit code.
        argv: Its arguments, the same in every process.
        nproc: Number of processes.

    Raises:
        torch.multiprocessing.ProcessRaisedException: A process failed or exited non-zero.
    """
    torch.multiprocessing.spawn(_spawned, args=(entry, nproc, free_port(), argv), nprocs=nproc)


def _spawned(rank: int, entry: Callable[[list[str]], int], nproc: int, port: int,
             argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    code = entry(argv)
    if code:
        raise SystemExit(code)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> None:
    """Join the process group that ``torchrun`` (or ``--nproc``) describes in the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method="env://")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def flushes_denormals(device: str) -> bool:
    """Whether :func:`session` flushes subnormal floats to zero for work on ``device``."""
    return torch.device(device).type == "cpu"


@contextmanager
def session(device: str) -> Iterator[None]:
    """The setting of one process's work on ``device``, undone on exit.

    On entry, joins the process group if the environment describes one of several processes
    and none is joined yet (:func:`init_distributed`), and on CPU flushes subnormal floats to
    zero. On exit (also on an exception), restores the float mode and leaves the process group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        init_distributed(device)
    # Subnormal floats are ~100x slower on CPUs; they appear late in some runs (Adam on
    # fmnist-cnn after ~5 epochs) and would distort the wall-clock comparison. Flushed to zero
    # for every optimizer alike while the command runs.
    flush = flushes_denormals(device) and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)
        if dist.is_initialized():  # free the models and optimizers (hook cycles) first:
            gc.collect()  # gloo work freed during interpreter shutdown can abort the process
            dist.destroy_process_group()
