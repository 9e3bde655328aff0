"""``torch.distributed`` support: statistics averaging and the eigendecomposition work split.

Everything goes through one :class:`Communicator`. Without an initialised process group (or
with one rank) it is a no-op: averages return their input and every eigendecomposition is
local. With several ranks (gloo on CPU, NCCL on GPU):

* :meth:`Communicator.weighted_mean_async` all-reduces the statistics of every layer,
  weighted by each rank's number of examples, so that every rank holds the statistics of the
  global batch. Tensors are packed into buckets of at most :data:`BUCKET_ELEMENTS` elements,
  and each bucket's all-reduce is launched asynchronously as soon as it is packed; the
  returned :class:`PendingMean` awaits them all. The preconditioner launches the reduction of
  the MC statistics right after the sampled backward and waits for it in ``step()``, so it
  overlaps the user's backward pass (and DDP's gradient all-reduce).
* :meth:`Communicator.assign` splits work greedily by cost, largest first (each item goes to
  the rank with the least work so far), and :meth:`Communicator.share` broadcasts each owner's
  results to every rank, one packed broadcast per owner.

A failed collective (another rank crashed or left) raises a ``RuntimeError`` that says so.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

#: Largest number of elements in one all-reduce bucket.
BUCKET_ELEMENTS = 1 << 22


class Communicator:
    """The process group the optimizer talks to, or nothing.

    Attributes:
        rank, size: this process's rank and the world size (0 and 1 without a group).
        bytes_sent: payload bytes this rank has put into collectives so far.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.active = (dist.is_available() and dist.is_initialized()
                       and dist.get_world_size(group) > 1)
        self.rank = dist.get_rank(group) if self.active else 0
        self.size = dist.get_world_size(group) if self.active else 1
        self.bytes_sent = 0

    # ------------------------------------------------------------------ statistics
    def weighted_mean_async(self, items: Sequence[tuple[list[Tensor], float]]) -> PendingMean:
        """Launch the global weighted means: for item ``k`` with local tensors ``t_k`` and
        weight ``w_k`` (this rank's example count), ``PendingMean.wait()`` returns
        ``(Σ_r w_k^r t_k^r / W_k, W_k)`` with ``W_k = Σ_r w_k^r``. Every rank must pass items
        of the same shapes in the same order (zeros with weight 0 where it has none). Tensors
        of a zero total are returned as zeros. Without a group the items are returned as is.
        """
        if not self.active:
            return PendingMean(self, [(list(tensors), weight) for tensors, weight in items])
        flat = [(t * weight).reshape(-1) for tensors, weight in items for t in tensors]
        flat.append(torch.tensor([w for _, w in items], dtype=torch.float64,
                                 device=flat[0].device if flat else None))
        works = []
        for bucket in _buckets(flat):
            packed = torch.cat([flat[i] for i in bucket])
            self.bytes_sent += packed.numel() * packed.element_size()
            works.append((bucket, packed, self._call(dist.all_reduce, packed,
                                                     group=self.group, async_op=True)))
        return PendingMean(self, [([t.shape for t in tensors], 0.0) for tensors, _ in items],
                           works, [t.numel() for t in flat])

    # ------------------------------------------------------------------ work split
    def assign(self, costs: Sequence[float]) -> list[int]:
        """Owner rank of each work item: greedy by cost, largest first, onto the rank with the
        least assigned cost (ties to the lowest rank). Deterministic on every rank."""
        heap = [(0.0, r) for r in range(self.size)]
        owners = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, rank = heapq.heappop(heap)
            owners[i] = rank
            heapq.heappush(heap, (load + costs[i], rank))
        return owners

    def share(self, owners: Sequence[int], compute: Callable[[int], list[Tensor]],
              templates: Sequence[list[Tensor]]) -> list[list[Tensor]]:
        """Run ``compute(i)`` on the owner of each item and give every rank all results.

        ``templates[i]`` are tensors of the shapes and dtypes item ``i`` returns (the receive
        buffers of the other ranks). One broadcast per owner carries all its items.
        """
        results: list[list[Tensor] | None] = [
            compute(i) if owner == self.rank else None for i, owner in enumerate(owners)]
        if not self.active:
            return results  # type: ignore[return-value]
        for owner in range(self.size):
            items = [i for i, o in enumerate(owners) if o == owner]
            if not items:
                continue
            parts = results if owner == self.rank else templates
            packed = torch.cat([t.reshape(-1) for i in items for t in parts[i]])
            if owner == self.rank:
                self.bytes_sent += packed.numel() * packed.element_size()
            self._call(dist.broadcast, packed, src=dist.get_global_rank(self.group, owner)
                       if self.group is not None else owner, group=self.group)
            if owner != self.rank:
                pos = 0
                for i in items:
                    unpacked = []
                    for t in templates[i]:
                        unpacked.append(packed[pos:pos + t.numel()].reshape(t.shape))
                        pos += t.numel()
                    results[i] = unpacked
        return results  # type: ignore[return-value]

    def _call(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as e:  # gloo/NCCL errors when a peer is gone
            raise RuntimeError(
                f"tekfac: a collective on rank {self.rank} of {self.size} failed; another rank "
                f"probably crashed or left the process group ({e})") from e


class PendingMean:
    """The result of :meth:`Communicator.weighted_mean_async`, possibly still in flight."""

    def __init__(self, comm: Communicator, items: list[tuple[list, float]],
                 works: list | None = None, sizes: list[int] | None = None):
        self._comm, self._items, self._works, self._sizes = comm, items, works, sizes

    def wait(self) -> list[tuple[list[Tensor], float]]:
        """Block until the reduction is done; ``[(means, total weight)]`` per item."""
        if self._works is None:
            return self._items
        flat: list[Tensor] = [None] * len(self._sizes)  # type: ignore[list-item]
        for bucket, packed, work in self._works:
            self._comm._call(work.wait)
            pos = 0
            for i in bucket:
                flat[i] = packed[pos:pos + self._sizes[i]]
                pos += self._sizes[i]
        out, pos = [], 0
        for (shapes, _), total in zip(self._items, flat[-1].tolist()):
            scale = 1.0 / total if total > 0 else 0.0
            out.append(([flat[pos + i].reshape(shape) * scale for i, shape in enumerate(shapes)],
                        total))
            pos += len(shapes)
        self._items, self._works = out, None
        return out


def _buckets(flat: list[Tensor]) -> list[list[int]]:
    """Indices of ``flat`` grouped into same-dtype buckets of at most BUCKET_ELEMENTS."""
    buckets: list[list[int]] = []
    open_bucket: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, t in enumerate(flat):
        bucket, size = open_bucket.get(t.dtype, ([], 0))
        if bucket and size + t.numel() > BUCKET_ELEMENTS:
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append(i)
        open_bucket[t.dtype] = (bucket, size + t.numel())
    buckets += [bucket for bucket, _ in open_bucket.values() if bucket]
    return buckets
