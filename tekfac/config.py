"""Validated configuration of the curvature estimate shared by all four methods.

A method is a pair of strategies (DESIGN.md §2): which factors give the eigenbasis
(``"kronecker"`` or ``"trace_restricted"``) and which diagonal scales it (``"kronecker"``
eigenvalues or ``"corrected"`` second moments). :data:`METHODS` names the four pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tekfac.factors import FACTOR_KINDS as _FACTOR_KINDS

FACTOR_KINDS = tuple(_FACTOR_KINDS)  # one source: the kinds tekfac.factors implements
SCALING_KINDS = ("kronecker", "corrected")
DAMPING_TYPES = ("eigenvalue", "pi", "trace_relative")
FISHER_TYPES = ("mc", "empirical")
LOSSES = ("cross_entropy", "mse", "bce_with_logits")
REDUCTIONS = ("mean", "sum")

#: method name -> (factor kind, scaling kind); DESIGN.md §2 table.
METHODS: dict[str, tuple[str, str]] = {
    "kfac": ("kronecker", "kronecker"),
    "ekfac": ("kronecker", "corrected"),
    "tkfac": ("trace_restricted", "kronecker"),
    "tekfac": ("trace_restricted", "corrected"),
}


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(allowed)}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")


def _number(name: str, value: object, low: float, high: float = float("inf"),
            low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r}; expected a number")
    too_low = value <= low if low_open else value < low
    if too_low or value > high or value != value:
        bracket = "(" if low_open else "["
        raise ValueError(f"Invalid {name}: {value!r}; expected a value in {bracket}{low}, {high}]")


@dataclass(frozen=True, kw_only=True)
class CurvatureConfig:
    """Everything that defines a layer's curvature estimate and how often it is refreshed.

    Args:
        factors: ``"kronecker"`` (KFAC factors ``A, G``) or ``"trace_restricted"``
            (``Φ, Ψ, δ`` of TKFAC), DESIGN.md §2(a).
        scaling: ``"kronecker"`` (products of factor eigenvalues) or ``"corrected"``
            (EKFAC second moments in the eigenbasis), DESIGN.md §2(b).
        damping: λ for ``"eigenvalue"`` and ``"pi"`` damping, γ for ``"trace_relative"``.
        damping_type: ``"eigenvalue"`` (``1/(S+λ)``), ``"pi"`` (factored Tikhonov damping of
            Martens & Grosse 2015, Kronecker scaling only) or ``"trace_relative"``
            (``λ_l = max(γ·tr(F̂_l)/p_l, damping_floor)``), DESIGN.md §3.
        damping_floor: lower bound of the trace-relative damping (ignored otherwise).
        fisher: ``"mc"`` (true Fisher, labels sampled from the model) or ``"empirical"``.
        loss: the training loss, which fixes the MC sampling distribution: ``"cross_entropy"``
            (categorical), ``"mse"`` (Gaussian of variance ½) or ``"bce_with_logits"``
            (Bernoulli). Ignored by the empirical Fisher.
        reduction: how the training loss reduces over the batch, ``"mean"`` or ``"sum"``.
        stat_decay: EMA weight of the old statistics, in ``[0, 1)``.
        cov_update_freq: steps between factor (and δ) updates.
        eigen_update_freq: steps between eigendecompositions.
        scale_update_freq: steps between corrected-scaling updates (ignored by Kronecker
            scaling).
        factor_dtype: dtype of statistics and eigendecompositions; ``None`` uses the
            parameters' dtype.
    """

    factors: str
    scaling: str
    damping: float = 0.1
    damping_type: str = "eigenvalue"
    damping_floor: float = 1e-8
    fisher: str = "mc"
    loss: str = "cross_entropy"
    reduction: str = "mean"
    stat_decay: float = 0.95
    cov_update_freq: int = 10
    eigen_update_freq: int = 100
    scale_update_freq: int = 10
    factor_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        _choice("factors", self.factors, FACTOR_KINDS)
        _choice("scaling", self.scaling, SCALING_KINDS)
        _choice("damping_type", self.damping_type, DAMPING_TYPES)
        _choice("fisher", self.fisher, FISHER_TYPES)
        _choice("loss", self.loss, LOSSES)
        _choice("reduction", self.reduction, REDUCTIONS)
        _number("damping", self.damping, 0.0, low_open=True)
        _number("damping_floor", self.damping_floor, 0.0)
        _number("stat_decay", self.stat_decay, 0.0, 1.0)
        if self.stat_decay >= 1.0:
            raise ValueError(f"Invalid stat_decay: {self.stat_decay!r}; expected a value in "
                             "[0, 1) (1 would never update the statistics)")
        for name in ("cov_update_freq", "eigen_update_freq", "scale_update_freq"):
            _positive_int(name, getattr(self, name))
        if self.damping_type == "pi" and self.scaling != "kronecker":
            raise ValueError("Invalid damping_type: 'pi' factored damping needs Kronecker "
                             "eigenvalues (KFAC or TKFAC); use 'eigenvalue' or "
                             "'trace_relative' damping with EKFAC/TEKFAC")
        dtype = self.factor_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Invalid factor_dtype: {self.factor_dtype!r}; expected a floating "
                            "torch.dtype such as torch.float32, or None")

    @classmethod
    def for_method(cls, method: str, **options: object) -> CurvatureConfig:
        """Build the configuration of a named method (``"kfac"``, ``"ekfac"``, ...)."""
        key = method.lower() if isinstance(method, str) else method
        if key not in METHODS:
            raise ValueError(f"Invalid method: {method!r}; expected one of {', '.join(METHODS)}")
        valid = [f.name for f in dataclasses.fields(cls) if f.name not in ("factors", "scaling")]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown}; valid options are {valid}")
        factors, scaling = METHODS[key]
        return cls(factors=factors, scaling=scaling, **options)  # type: ignore[arg-type]
