"""Parameters sharded as ``DTensor`` (FSDP2's ``fully_shard``, HSDP): their local shards, the
full tensor, and a full tensor's shard (docs/design.md §5, "Sharded parameters").

Under FSDP2 a parameter, its ``.grad`` and every per-parameter state of the optimizer (the
momentum buffer) are ``DTensor``s on a device mesh: ``Shard(0)`` on a 1-D mesh, or
``(Replicate(), Shard(0))`` on HSDP's 2-D mesh. The forward and backward passes see full
(unsharded) plain tensors, so the recorded statistics are the same as without sharding; only
the step meets shards. These helpers are the one place that knows it. A plain tensor passes
through every one of them unchanged, so that the same code serves one process, DDP and
FSDP2.
"""

from __future__ import annotations

from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor
except ImportError:  # a build without torch.distributed
    DTensor = Partial = distribute_tensor = None


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor``."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of ``tensor`` (a plain tensor is its own)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole of ``tensor`` as a plain tensor; a collective of its mesh for a
    ``DTensor`` (an all-gather of its shards)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(whole: Tensor, param: Tensor) -> Tensor:
    """``whole`` (a plain tensor of ``param``'s global shape, the same on every rank) placed
    as ``param`` is: for a ``DTensor``, this rank's shard of it, cut locally (no
    communication); else ``whole`` itself."""
    if not is_sharded(param):
        return whole
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)


def sharded_parameters(model: nn.Module) -> list[str]:
    """The names of the model's trainable parameters that are ``DTensor``s."""
    return [name for name, p in model.named_parameters() if p.requires_grad and is_sharded(p)]


def check_sharding(model: nn.Module) -> None:
    """``ValueError`` for the shardings tekfac does not support, which would otherwise give
    wrong statistics or fail deep in a step: FSDP1 (``FullyShardedDataParallel``, whose flat
    parameters hide the layers' weights), tensor parallelism (``DTensor`` parameters outside
    ``fully_shard``, or sharded along a second mesh dimension: the layers would see shards
    of their activations) and ``Partial`` placements. FSDP2's ``fully_shard`` on a 1-D mesh
    or HSDP's 2-D mesh passes."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a build without torch.distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError("Invalid model: it is wrapped in FSDP1's FullyShardedDataParallel, "
                         "whose flat parameters hide the layers' weights; shard it with "
                         "FSDP2 (torch.distributed.fsdp.fully_shard) instead and build the "
                         "optimizer after sharding")
    managed = {id(p) for m in model.modules() if isinstance(m, FSDPModule)
               for p in m.parameters()}
    for name, p in model.named_parameters():
        if not is_sharded(p):
            continue
        shards = [pl for pl in p.placements if pl.is_shard()]
        if id(p) not in managed or len(shards) > 1 or any(
                isinstance(pl, Partial) for pl in p.placements):
            where = ("outside fully_shard" if id(p) not in managed
                     else "sharded on several mesh dimensions or with a pending reduction")
            raise ValueError(
                f"Invalid parameter {name!r}: a DTensor with placements {p.placements}, "
                f"{where}. tekfac supports FSDP2's fully_shard alone (a 1-D mesh, or HSDP's "
                "replicate × shard mesh); tensor parallelism shards the layers' activations, "
                "which its statistics need whole, and is not supported: apply fully_shard "
                "without parallelize_module")
