"""Which of a step's updates are due (docs/design.md §4): statistics, bases, scaling.

Every frequency counts optimizer steps from 0, and an update with frequency ``f`` is due at
the steps ``s`` with ``s % f == 0``. A layer without a basis yet gets one at its first
factor update, whatever the eigendecomposition frequency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tekfac.config import CurvatureConfig


class Schedule:
    """The due updates of a configuration (the frequencies of :class:`CurvatureConfig`).

    Args:
        refits: whether the scaling kind re-fits ``S`` (EKFAC, TEKFAC).
    """

    def __init__(self, config: CurvatureConfig, refits: bool):
        self.refits = refits
        self.factor_freq, self.basis_freq = config.cov_update_freq, config.eigen_update_freq
        self.scale_freq, self.refresh_freq = config.scale_update_freq, config.basis_refresh_freq

    def factors(self, step: int) -> bool:
        """Whether step ``step`` updates the factors' averages."""
        return step % self.factor_freq == 0

    def bases(self, step: int) -> bool:
        """Whether step ``step`` eigendecomposes every layer's factors."""
        return step % self.basis_freq == 0

    def cheap_refresh(self, step: int) -> bool:
        """Whether step ``step`` refreshes the bases by a power iteration (§4.2)."""
        return self.refresh_freq is not None and step % self.refresh_freq == 0

    def scaling(self, step: int) -> bool:
        """Whether step ``step`` re-fits the scaling ``S`` (never for KFAC and TKFAC)."""
        return self.refits and step % self.scale_freq == 0

    def statistics(self, step: int) -> bool:
        """Whether step ``step`` records statistics (factors or a re-fitted scaling)."""
        return self.factors(step) or self.scaling(step)

    def basis_kept(self, step: int) -> bool:
        """Whether step ``step`` changes no basis (that exists), so that the scaling can be
        re-fitted in the current bases as soon as the step's statistics are recorded."""
        return not (self.bases(step) or self.cheap_refresh(step))
