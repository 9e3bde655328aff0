"""Guards against bad numbers: finiteness checks and warnings issued once (docs/design.md §8).

A non-finite statistic or a failed eigendecomposition must skip that update and keep the
last good state, and say so once; :func:`non_finite` finds the culprits with one host
synchronisation, :class:`WarnOnce` says it once per place and cause.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

Key = TypeVar("Key", bound=Hashable)


def non_finite(tensors: dict[Key, Sequence[Tensor]]) -> list[Key]:
    """The keys with a NaN or Inf in any of their tensors, in the order of ``tensors``; one
    host synchronisation for all keys together (the flags are gathered on the device of the
    first key's tensors)."""
    if not tensors:
        return []
    flags = [torch.stack([torch.isfinite(t).all() for t in ts]).all() for ts in tensors.values()]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [key for key, ok in zip(tensors, finite) if not ok]


class WarnOnce:
    """Issues each ``RuntimeWarning`` once per (place, message)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, place: str, message: str, stacklevel: int = 3) -> None:
        """Warn ``tekfac: <place>: <message>`` unless that was warned before."""
        if (place, message) not in self._seen:
            self._seen.add((place, message))
            warnings.warn(f"tekfac: {place}: {message}", RuntimeWarning, stacklevel=stacklevel)
