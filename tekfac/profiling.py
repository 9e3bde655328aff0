"""Named profiler ranges around the stages of the preconditioner (docs/design.md §5).

Every stage opens ``torch.profiler.record_function("tekfac.<stage>")``, so a
``torch.profiler`` trace of a training loop shows where an optimizer step spends its time,
and ``benchmarks/step_time.py`` reads its breakdown from these ranges. Ranges never nest;
without an active profiler they cost next to nothing.
"""

from __future__ import annotations

from torch.profiler import record_function

#: The stages, in the order of a step.
STAGES = ("statistics", "eigendecomposition", "scaling", "preconditioning", "quadratic",
          "update", "damping")


def stage(name: str) -> record_function:
    """The profiler range of stage ``name`` (one of :data:`STAGES`), as a context manager."""
    if name not in STAGES:
        raise ValueError(f"Invalid stage: {name!r}; expected one of {', '.join(STAGES)}")
    return record_function(f"tekfac.{name}")
