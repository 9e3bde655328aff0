"""Guards against bad numbers: finiteness checks and warnings issued once (docs/design.md §8).

A non-finite statistic or a failed eigendecomposition must skip that update and keep the
last good state, and say so once; :func:`non_finite` finds the culprits with one host
synchronisation, :func:`all_finite` checks a step's gradients without one, and
:class:`Faults` warns once per place and cause and counts the later occurrences.
:func:`user_stacklevel` makes a warning point at the user's line.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Hashable, Sequence
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


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every entry of ``tensors`` is finite, as a 0-dim bool tensor on the first
    tensor's device (no host synchronisation: a NaN or Inf anywhere makes the sum of sums
    non-finite); ``True`` for no tensors."""
    if not tensors:
        return torch.tensor(True)
    device = tensors[0].device
    return torch.stack([t.sum(dtype=torch.float32).to(device) for t in tensors]).sum().isfinite()


class Faults:
    """The faults seen so far, each keyed by (place, cause): the step it first occurred at
    and how often it occurred. The first occurrence is warned about (naming the place, the
    cause, what was done and the step); later ones are only counted."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], dict[str, int]] = {}

    def __call__(self, place: str, cause: str, consequence: str, step: int,
                 stacklevel: int = 3) -> None:
        record = self.records.get((place, cause))
        if record is not None:
            record["count"] += 1
            return
        self.records[(place, cause)] = {"first_step": step, "count": 1}
        warnings.warn(f"tekfac: {place}: {cause}; {consequence} (step {step}; later "
                      "occurrences are counted in the optimizer's faults)", RuntimeWarning,
                      stacklevel=stacklevel)

    def state_dict(self) -> str:
        """The records as JSON, a list of plain dicts (checkpoint format; a string, so that
        ``torch.distributed.checkpoint`` saves it whole)."""
        return json.dumps([{"place": place, "cause": cause, **record}
                           for (place, cause), record in self.records.items()])

    def load_state_dict(self, entries: str | Sequence[dict]) -> None:
        """Restore :meth:`state_dict` (or the list that formats 1 and 2 saved); ``ValueError``
        if it cannot be read, the records unchanged."""
        try:
            entries = json.loads(entries) if isinstance(entries, str) else entries
            records = {(e["place"], e["cause"]): {"first_step": int(e["first_step"]),
                                                  "count": int(e["count"])} for e in entries}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Invalid state_dict: its faults cannot be read ({e!r})") from e
        self.records = records

    def merge(self, others: Sequence[str]) -> str:
        """:meth:`state_dict` of these records and those of ``others`` (other ranks'
        :meth:`state_dict`), a fault seen on several counted from its first step on any
        with its largest count."""
        merged = {key: dict(record) for key, record in self.records.items()}
        for entries in others:
            for e in json.loads(entries):
                record = merged.setdefault((e["place"], e["cause"]), dict(
                    first_step=e["first_step"], count=e["count"]))
                record["first_step"] = min(record["first_step"], e["first_step"])
                record["count"] = max(record["count"], e["count"])
        return json.dumps([{"place": place, "cause": cause, **record}
                           for (place, cause), record in merged.items()])


def step_fault(bad_outputs: Tensor | None, grads: Sequence[Tensor],
               reduce_max: Callable[[Tensor], Tensor]) -> str | None:
    """Why a step must be skipped whole, or ``None``: ``bad_outputs`` (a 0-dim bool tensor:
    non-finite model outputs or loss; ``None``: none seen) or a non-finite entry of
    ``grads``. One host synchronisation; ``reduce_max`` (the process group's maximum) makes
    the answer every rank's."""
    device = grads[0].device if grads else torch.device("cpu")
    outputs = bad_outputs if bad_outputs is not None else torch.tensor(False)
    flags = torch.stack([outputs.to(device), ~all_finite(grads).to(device)]).float()
    bad_outputs_seen, bad_grads = reduce_max(flags).tolist()
    if bad_outputs_seen:
        return "non-finite model outputs or loss"
    return "non-finite gradient" if bad_grads else None


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function point at
    the first frame outside the tekfac package: the user's line, however deep inside
    tekfac the warning is raised (constructors reach the layer plan through different
    paths)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
