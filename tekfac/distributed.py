"""``torch.distributed`` support: statistics averaging and the eigendecomposition work split.

Everything goes through one :class:`Communicator`. Without an initialised process group (or
with one rank) it is a no-op: averages return their input and every eigendecomposition is
local. With several ranks (gloo on CPU, NCCL on GPU):

* :meth:`Communicator.weighted_mean_async` averages the statistics of every layer over the
  ranks, weighted by each rank's number of examples, so that every rank (all-reduce) or the
  layer's owner (reduce) holds the statistics of the global batch. Tensors are packed into
  buckets of at most :data:`BUCKET_ELEMENTS` elements, and each bucket's reduction is
  launched asynchronously as soon as it is packed; the returned :class:`PendingMean` awaits
  them all. The preconditioner launches the reduction of the MC statistics right after the
  sampled backward and waits for it in ``step()``, so it overlaps the user's backward pass
  (and DDP's gradient all-reduce).
* :meth:`Communicator.assign` splits work greedily by cost, largest first (each item goes to
  the rank with the least work so far), and :meth:`Communicator.share` broadcasts each owner's
  results to every rank, one packed broadcast per owner.
* :class:`WorkSplit` is the one place that decides which rank does what for the
  preconditioner: the owner of each eigendecomposition (by the cost model :func:`eigh_cost`)
  or, in 'owner' mode, of each layer's whole curvature; zero padding for layers a rank has no
  examples of; the reductions launched per micro-batch and their combination; and the
  broadcasts of owned results (directions, bases, checkpoint state).

A failed collective raises a ``RuntimeError`` with its cause: that another rank probably
crashed or left when the error says a peer is gone, else the error itself.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from tekfac.state import state_shapes
from tekfac.truncation import grid_length

if TYPE_CHECKING:
    from tekfac.guards import Faults
    from tekfac.layers import KroneckerLayer
    from tekfac.state import LayerState

#: Largest number of elements in one all-reduce bucket.
BUCKET_ELEMENTS = 1 << 22

#: Per layer: its statistics (a list of tensors) and the example count they are a mean over.
Weighted = tuple[list[Tensor], float]


class Communicator:
    """The process group the optimizer talks to, or nothing.

    Attributes:
        rank, size: this process's rank and the world size (0 and 1 without a group).
        bytes_sent: payload bytes this rank has put into collectives so far.
        wait_s: seconds this rank has spent blocked in :meth:`PendingMean.wait` so far.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.active = (dist.is_available() and dist.is_initialized()
                       and dist.get_world_size(group) > 1)
        self.rank = dist.get_rank(group) if self.active else 0
        self.size = dist.get_world_size(group) if self.active else 1
        self.bytes_sent = 0
        self.wait_s = 0.0

    # ------------------------------------------------------------------ statistics
    def weighted_mean_async(self, items: Sequence[tuple[list[Tensor], float]],
                            dst: int | None = None) -> PendingMean:
        """Launch the global weighted means: for item ``k`` with local tensors ``t_k`` and
        weight ``w_k`` (this rank's example count), ``PendingMean.wait()`` returns
        ``(Σ_r w_k^r t_k^r / W_k, W_k)`` with ``W_k = Σ_r w_k^r``, on every rank or, with
        ``dst``, on rank ``dst`` only (a reduce; the other ranks get meaningless values).
        Every rank must pass items of the same shapes in the same order (zeros with weight 0
        where it has none). Tensors of a zero total are returned as zeros. Without a group
        the items are returned as is.
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
            if dst is None:
                work = self._call(dist.all_reduce, packed, group=self.group, async_op=True)
            else:
                work = self._call(dist.reduce, packed, dst=self.global_rank(dst),
                                  group=self.group, async_op=True)
            works.append((bucket, packed, work))
        return PendingMean(self, [([t.shape for t in tensors], 0.0) for tensors, _ in items],
                           works, [t.numel() for t in flat],
                           received=dst is None or dst == self.rank)

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over the ranks (itself without a group)."""
        if self.active:
            tensor = tensor.clone()
            self._call(dist.all_reduce, tensor, group=self.group)
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum of ``tensor`` over the ranks (itself without a group)."""
        if self.active:
            tensor = tensor.clone()
            self._call(dist.all_reduce, tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

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
            packed = torch.cat([t.reshape(-1).to(template.dtype) for i in items
                                for t, template in zip(parts[i], templates[i])])
            if owner == self.rank:
                self.bytes_sent += packed.numel() * packed.element_size()
            self._call(dist.broadcast, packed, src=self.global_rank(owner), group=self.group)
            if owner != self.rank:
                pos = 0
                for i in items:
                    unpacked = []
                    for t in templates[i]:
                        unpacked.append(packed[pos:pos + t.numel()].reshape(t.shape).to(t.dtype))
                        pos += t.numel()
                    results[i] = unpacked
        return results  # type: ignore[return-value]

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a group."""
        if not self.active:
            return [obj]
        gathered: list[object] = [None] * self.size
        self._call(dist.all_gather_object, gathered, obj, group=self.group)
        return gathered

    def global_rank(self, rank: int) -> int:
        """The global rank of ``rank`` of this group."""
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _call(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if _peer_lost(e):
                raise RuntimeError(
                    f"tekfac: a collective on rank {self.rank} of {self.size} failed; another "
                    f"rank probably crashed or left the process group ({e})") from e
            raise RuntimeError(f"tekfac: a collective on rank {self.rank} of {self.size} "
                               f"failed: {e}") from e


#: Words of gloo's and NCCL's errors when a peer is gone (closed, reset or timed-out links).
_LOST_PEER = ("connection", "closed", "reset by peer", "timed out", "timeout", "broken pipe",
              "aborted", "remote process", "socket")


def _peer_lost(error: BaseException) -> bool:
    """Whether a collective's error says that another rank is gone (not a bad argument)."""
    message = str(error).lower()
    return any(word in message for word in _LOST_PEER)


class PendingMean:
    """The result of :meth:`Communicator.weighted_mean_async`, possibly still in flight."""

    def __init__(self, comm: Communicator, items: list[tuple[list, float]],
                 works: list | None = None, sizes: list[int] | None = None,
                 received: bool = True):
        self._comm, self._items, self._works, self._sizes = comm, items, works, sizes
        self._received = received

    def wait(self) -> list[tuple[list[Tensor], float]]:
        """Block until the reduction is done; ``[(means, total weight)]`` per item, or ``[]``
        on a rank that a reduce onto another does not give the result."""
        if self._works is None:
            return self._items
        flat: list[Tensor] = [None] * len(self._sizes)  # type: ignore[list-item]
        start = time.perf_counter()
        for _, _, work in self._works:
            self._comm._call(work.wait)
        self._comm.wait_s += time.perf_counter() - start
        if not self._received:
            self._items, self._works = [], None
            return []
        for bucket, packed, _ in self._works:
            pos = 0
            for i in bucket:
                flat[i] = packed[pos:pos + self._sizes[i]]
                pos += self._sizes[i]
        out, pos = [], 0
        for (shapes, _), total in zip(self._items, flat[-1].tolist()):
            sums = [flat[pos + i].reshape(shape) for i, shape in enumerate(shapes)]
            out.append((_share(sums, 1.0, total), total))
            pos += len(shapes)
        self._items, self._works = out, None
        return out


def _share(tensors: Sequence[Tensor], weight: float, total: float) -> list[Tensor]:
    """``tensors · weight / total`` (zeros for a zero total): one term of a weighted mean."""
    share = weight / total if total > 0 else 0.0
    return [t * share for t in tensors]


def weighted_mean(items: Sequence[Weighted]) -> Weighted:
    """``(Σ_k w_k t_k / Σ_k w_k, Σ_k w_k)`` over items ``(t_k, w_k)`` of the same shapes (the
    single item as it is)."""
    if len(items) == 1:
        return items[0]
    total = sum(weight for _, weight in items)
    terms = [_share(tensors, weight, total) for tensors, weight in items]
    return [sum(parts) for parts in zip(*terms)], total


def eigh_cost(d: int) -> float:
    """The cost model of the work split: a ``(d, d)`` eigendecomposition costs ``d³``."""
    return float(d) ** 3


class WorkSplit:
    """Which rank does what for a preconditioner's layers.

    Args:
        comm: the process group, or none.
        layers: the tracked layers, in the same order on every rank.
        owner_mode: each layer's curvature (factors, basis, scaling) lives on one rank only
            (``distributed_mode='owner'``), which receives its statistics by a reduce,
            preconditions the layer and broadcasts the direction.
        factor_dtype: the statistics' dtype (``None``: each layer's weight dtype).

    Attributes:
        owners: layer → the rank that keeps its curvature ('owner' mode in a process group),
            else ``None`` (every rank keeps every layer's).
    """

    def __init__(self, comm: Communicator, layers: Sequence[KroneckerLayer], owner_mode: bool,
                 factor_dtype: torch.dtype | None = None):
        self.comm, self.factor_dtype = comm, factor_dtype
        self.layers = list(layers)
        #: statistics kind → the reductions launched this step (one per owner and micro-batch)
        self._in_flight: dict[str, list[tuple[list[KroneckerLayer], PendingMean]]] = {}
        self.owners: dict[KroneckerLayer, int] | None = None
        if owner_mode and comm.active:
            costs = [eigh_cost(la.d_in) + eigh_cost(la.d_out) for la in layers]
            self.owners = dict(zip(layers, comm.assign(costs)))

    def mine(self, layer: KroneckerLayer) -> bool:
        """Whether this rank keeps the layer's curvature (always, unless in 'owner' mode)."""
        return self.owners is None or self.owners[layer] == self.comm.rank

    def _groups(self, layers: Sequence[KroneckerLayer]
                ) -> Iterator[tuple[int | None, list[KroneckerLayer]]]:
        """``layers`` by owner, in rank order: ``(owner, its layers)``; ``(None, layers)``
        without owners."""
        if self.owners is None:
            yield None, list(layers)
            return
        for owner in range(self.comm.size):
            group = [la for la in layers if self.owners[la] == owner]
            if group:
                yield owner, group

    def padded(self, stats: dict[KroneckerLayer, Weighted], layers: Sequence[KroneckerLayer],
               zeros: Callable[[KroneckerLayer], list[Tensor]]) -> dict[KroneckerLayer, Weighted]:
        """``stats`` of the ``layers`` this rank has examples of; in a process group, every
        one of ``layers`` in order, with ``zeros(layer)`` of weight 0 where this rank has
        none, so that every rank reduces the same tensors in the same order."""
        if not self.comm.active:
            return {la: stats[la] for la in layers if la in stats}
        return {la: stats[la] if la in stats else (zeros(la), 0.0) for la in layers}

    def launch(self, kind: str, stats: dict[KroneckerLayer, Weighted]) -> None:
        """Launch the cross-rank mean of one micro-batch's ``kind`` statistics ``stats``
        (:meth:`padded`), to be awaited by :meth:`reduced`: an all-reduce, or a reduce onto
        each layer's owner."""
        for owner, layers in self._groups(list(stats)):
            self._in_flight.setdefault(kind, []).append((layers, self.comm.weighted_mean_async(
                [stats[la] for la in layers], dst=owner)))

    def reduced(self, kind: str, compute: Callable[[], dict[KroneckerLayer, Weighted]]
                ) -> dict[KroneckerLayer, Weighted]:
        """Layer → (global mean of its ``kind`` statistics, global example count) for this
        step, for the layers this rank keeps: the reductions launched so far, micro-batches
        combined by their example counts (layers in their order), or, if none was launched,
        those of ``compute()`` now."""
        if not self._in_flight.get(kind):
            self.launch(kind, compute())
        parts = [dict(zip(layers, pending.wait()))
                 for layers, pending in self._in_flight.setdefault(kind, [])]
        self._in_flight[kind].clear()
        got = {la: [part[la] for part in parts if la in part] for la in self.layers}
        return {la: weighted_mean(items) for la, items in got.items() if items}

    def clear(self, wait: bool = False) -> None:
        """Forget the reductions still in flight (after they are done, if ``wait``)."""
        if wait:
            for pending in self._in_flight.values():
                for _, reduction in pending:
                    reduction.wait()
        self._in_flight.clear()

    def eigendecompositions(self, matrices: Sequence[Tensor],
                            compute: Callable[[int], list[Tensor]],
                            kept: Sequence[int] | None = None) -> Iterator[list[Tensor]]:
        """``compute(i)`` (an eigendecomposition ``[values, vectors]`` of ``matrices[i]``,
        truncated to ``kept[i]`` vectors plus a remainder value if fewer than its size) for
        every matrix, in order. Where every rank keeps every basis, in a process group, the
        matrices are split over the ranks by :func:`eigh_cost` and the results shared;
        otherwise each is computed lazily as it is consumed, so that a layer's previous basis
        can be freed before the next one is computed."""
        if self.owners is None and self.comm.active:
            owners = self.comm.assign([eigh_cost(m.shape[0]) for m in matrices])
            kept = kept or [len(m) for m in matrices]
            templates = [[m.new_empty(grid_length(k, len(m))), m.new_empty(len(m), k)]
                         for m, k in zip(matrices, kept)]
            yield from self.comm.share(owners, compute, templates)
        else:
            yield from (compute(i) for i in range(len(matrices)))

    def preconditioned(self, grads: dict[KroneckerLayer, Tensor],
                       precondition: Callable[[KroneckerLayer], Tensor]
                       ) -> list[tuple[KroneckerLayer, Tensor]]:
        """``(layer, precondition(layer))`` for every layer of ``grads`` (its gradient
        matrices, the same on every rank): computed by every rank, or by each layer's owner
        and broadcast (one packed broadcast per owner)."""
        layers = list(grads)
        if self.owners is None:
            return [(la, precondition(la)) for la in layers]
        shared = self.from_owners(layers, lambda i: [precondition(layers[i])],
                                  [[grads[la]] for la in layers])
        return [(la, d) for la, (d,) in zip(layers, shared)]

    def check_mine(self, layer: KroneckerLayer) -> None:
        """``RuntimeError`` unless this rank keeps the layer's curvature."""
        if not self.mine(layer):
            raise RuntimeError(f"Layer {layer.name!r} is held by rank {self.owners[layer]} "
                               "(distributed_mode='owner'); ask that rank")

    def from_owners(self, layers: Sequence[KroneckerLayer],
                    compute: Callable[[int], list[Tensor]],
                    templates: Sequence[list[Tensor]]) -> list[list[Tensor]]:
        """``compute(i)`` run by the owner of ``layers[i]`` and given to every rank
        (``templates[i]``: tensors of the shapes and dtypes it returns)."""
        return self.comm.share([self.owners[la] for la in layers], compute, templates)

    def owned_state(self, states: dict[KroneckerLayer, LayerState]) -> list[dict[str, Tensor]]:
        """Per layer, the state fields that only its owner keeps (all of them), broadcast
        from the owner; empty dicts without owners. A collective: call it on every rank."""
        layers = list(states)
        if self.owners is None:
            return [{} for _ in layers]
        keys = [list(state_shapes(la)) for la in layers]
        shared = self.from_owners(
            layers, lambda i: self._message(layers[i], states[layers[i]], keys[i]),
            [self._templates(la, names) for la, names in zip(layers, keys)])
        return [_flagged(names, values) for names, values in zip(keys, shared)]

    def bases(self, states: dict[KroneckerLayer, LayerState]
              ) -> Iterator[tuple[KroneckerLayer, Tensor | None, Tensor | None]]:
        """``(layer, U_in, U_out)`` (``None``: a diagonal side) of every layer that has a
        basis. Where layers have owners this is a collective: each owner broadcasts its
        layers' bases in turn, so that a rank holds at most one other owner's at a time."""
        for owner, layers in self._groups(self.layers):
            if owner is None:
                yield from ((la, states[la].basis_in, states[la].basis_out) for la in layers
                            if states[la].has_basis)
                continue
            keys = [[k for k in ("basis_in", "basis_out") if k in state_shapes(la)]
                    for la in layers]
            shared = self.comm.share(
                [owner] * len(layers),
                lambda i, ls=layers, ks=keys: self._message(ls[i], states[ls[i]], ks[i]),
                [self._templates(la, names) for la, names in zip(layers, keys)])
            for layer, names, message in zip(layers, keys, shared):
                if message[0][-1]:  # the owner has a basis
                    held = _flagged(names, message)
                    yield layer, held.get("basis_in"), held.get("basis_out")

    def knows_bases(self, states: dict[KroneckerLayer, LayerState]) -> bool:
        """Whether every rank holds every layer's basis (no owners, and each has one)."""
        return self.owners is None and all(states[la].has_basis for la in self.layers)

    def _templates(self, layer: KroneckerLayer, keys: Sequence[str]) -> list[Tensor]:
        """Receive buffers of :meth:`_message` for ``keys`` of ``layer``'s state."""
        shapes = state_shapes(layer)
        return [self.zeros(layer, len(keys) + 1)] + [
            self.zeros(layer, *shapes[k]).to(torch.float64 if k.endswith("_weight") else None)
            for k in keys]

    def _message(self, layer: KroneckerLayer, state: LayerState, keys: Sequence[str]
                 ) -> list[Tensor]:
        """``[flags, *values]`` of ``keys`` of ``state`` for a broadcast: ``flags[k]`` is 1
        where the field is set (else its value is zeros), the last whether it has a basis."""
        templates = self._templates(layer, keys)
        values = [getattr(state, k) for k in keys]
        templates[0].copy_(torch.tensor([v is not None for v in values] + [state.has_basis]))
        return templates[:1] + [t if v is None else v.to(t.dtype)
                                for v, t in zip(values, templates[1:])]

    def faults(self, faults: Faults) -> str:
        """The checkpoint form of ``faults`` (:meth:`Faults.state_dict`), with owners merged
        with every other rank's: only a layer's owner sees its statistics, and so its faults.
        A collective where layers have owners."""
        if self.owners is None:
            return faults.state_dict()
        return faults.merge(self.comm.gather_objects(faults.state_dict()))

    def drop_unkept(self, layer: KroneckerLayer, state: LayerState) -> None:
        """Forget what this rank does not keep of ``layer``'s ``state`` (a checkpoint's)."""
        if not self.mine(layer):
            for key in state_shapes(layer):
                setattr(state, key, None)

    def dtype(self, layer: KroneckerLayer) -> torch.dtype:
        """The dtype of the layer's statistics: ``factor_dtype``, or its weight's."""
        return self.factor_dtype or layer.module.weight.dtype

    def zeros(self, layer: KroneckerLayer, *shape: int) -> Tensor:
        """Zeros of ``shape`` in the layer's statistics dtype, on its weight's device."""
        return torch.zeros(shape, dtype=self.dtype(layer), device=layer.module.weight.device)


def _flagged(keys: Sequence[str], message: list[Tensor]) -> dict[str, Tensor]:
    """The fields of a :meth:`WorkSplit._message` that were set."""
    flags = message[0].tolist()
    return {key: value for key, value, flag in zip(keys, message[1:], flags) if flag}


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
