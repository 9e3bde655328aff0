"""Levenberg–Marquardt adaptation of the damping (Martens & Grosse 2015, §6.5; docs/design.md §3).

Every ``interval`` steps the optimizer compares the change of the batch loss that the step it
took actually made with the change its quadratic model predicted for that step,

.. math::
    ρ = \\frac{L(θ + δ) - L(θ)}{∇L^T δ + \\tfrac12 c\\, δ^T F̂ δ},

and multiplies the damping by ``ω`` when ``ρ > 3/4`` (the model is good: trust it more) or by
``1/ω`` when ``ρ < 1/4`` (it is not: damp more). ``c`` turns the per-example ``F̂`` of the
design's conventions into the curvature of the loss as the user reduced it
(:meth:`tekfac.fisher.FisherKind.curvature_multiplier`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tekfac.config import check_number, check_positive_int


@dataclass(frozen=True, kw_only=True)
class DampingAdaptation:
    """When and by how much the damping adapts.

    Args:
        interval: steps between adaptations (``T₁`` of Martens & Grosse), ≥ 1.
        decay: the factor ``ω`` in ``(0, 1)``; ``None`` (default) takes Martens & Grosse's
            ``(19/20)^interval``.
        lower, upper: the thresholds on ``ρ`` below which the damping rises and above which
            it falls, ``0 ≤ lower ≤ upper``.
    """

    interval: int = 5
    decay: float | None = None
    lower: float = 0.25
    upper: float = 0.75

    def __post_init__(self) -> None:
        check_positive_int("damping adaptation interval", self.interval)
        if self.decay is not None:
            check_number("damping adaptation decay", self.decay, 0.0, 1.0, low_open=True,
                         high_open=True)
        check_number("damping adaptation lower threshold", self.lower, 0.0)
        check_number("damping adaptation upper threshold", self.upper, self.lower)

    @property
    def omega(self) -> float:
        """The factor ``ω`` the damping is multiplied or divided by."""
        return (19 / 20) ** self.interval if self.decay is None else self.decay

    def due(self, step: int) -> bool:
        """Whether the step with counter ``step`` (before it advances) adapts the damping."""
        return step % self.interval == 0

    def adapted(self, damping: float, ratio: float | None, floor: float) -> float:
        """The next damping from the current one and the reduction ratio ``ρ`` (``None``:
        no information, unchanged), never below ``floor``."""
        if ratio is None:
            return damping
        if ratio > self.upper:
            return max(damping * self.omega, floor)
        if ratio < self.lower:
            return damping / self.omega
        return damping


def reduction_ratio(actual: float, predicted: float) -> float | None:
    """``ρ = actual / predicted``. ``None`` when the model predicts no decrease
    (``predicted ≥ 0``, e.g. a step that momentum carried uphill): the ratio then says nothing
    about the model's quality. ``-inf`` when the new loss is not finite."""
    if not math.isfinite(actual):
        return -math.inf
    if not math.isfinite(predicted) or predicted >= 0:
        return None
    return actual / predicted
