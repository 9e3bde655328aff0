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

from collections.abc import Iterable

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


def check_placements(named: Iterable[tuple[str, Tensor]]) -> None:
    """``ValueError`` for a ``DTensor`` parameter with a ``Partial`` placement (a pending
    reduction, which no step can read); ``Shard`` and ``Replicate`` placements are fine."""
    for name, p in named:
        if is_sharded(p) and any(isinstance(pl, Partial) for pl in p.placements):
            raise ValueError(f"Invalid parameter {name!r}: its DTensor placements "
                             f"{p.placements} include Partial; tekfac steps parameters that "
                             "are sharded (Shard) or replicated (Replicate), as fully_shard "
                             "makes them")
