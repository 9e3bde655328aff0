"""Validated configuration of the curvature estimate shared by all four methods, and the
argument checks every constructor of the package uses.

A method is a pair of strategies (docs/design.md §2): which factors give the eigenbasis
(``"kronecker"`` or ``"trace_restricted"``) and which diagonal scales it (``"kronecker"``
eigenvalues or ``"corrected"`` second moments). :data:`METHODS` names the four pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tekfac.damping import DAMPING_KINDS
from tekfac.factors import FACTOR_KINDS
from tekfac.fisher import FISHER_KINDS, LIKELIHOODS
from tekfac.scaling import SCALING_KINDS

REDUCTIONS = ("mean", "sum")

#: method name -> (factor kind, scaling kind); docs/design.md §2 table.
METHODS: dict[str, tuple[str, str]] = {
    "kfac": ("kronecker", "kronecker"),
    "ekfac": ("kronecker", "corrected"),
    "tkfac": ("trace_restricted", "kronecker"),
    "tekfac": ("trace_restricted", "corrected"),
}


def method_name(factors: str, scaling: str) -> str:
    """The name of the method with these kinds (``"TEKFAC"``), or a description."""
    names = [name.upper() for name, kinds in METHODS.items() if kinds == (factors, scaling)]
    return names[0] if names else "another method"


def saved_int(state_dict: dict, key: str) -> int:
    """A checkpoint's ``state_dict[key]`` as an int; ``ValueError`` naming the key if it is
    missing or not one."""
    try:
        return int(state_dict[key])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"Invalid state_dict: its {key!r} is not an integer ({e!r})") from e


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    """``ValueError`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(allowed)}")


def check_positive_int(name: str, value: object) -> None:
    """``ValueError`` unless ``value`` is an integer ≥ 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")


def check_number(name: str, value: object, low: float, high: float = float("inf"), *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``TypeError`` unless ``value`` is a real number (a bool is not); ``ValueError`` unless
    it lies in the interval from ``low`` to ``high`` (NaN never does)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r}; expected a number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {name}: {value!r}; expected a value in {interval}")


def check_instance(name: str, value: object, kind: type | tuple[type, ...], expected: str,
                   optional: bool = False) -> None:
    """``TypeError`` unless ``value`` is a ``kind`` (or ``None`` if ``optional``); a bool is
    no int here."""
    if optional and value is None:
        return
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TypeError(f"Invalid {name}: {value!r}; expected {expected}")


@dataclass(frozen=True, kw_only=True)
class CurvatureConfig:
    """Everything that defines a layer's curvature estimate and how often it is refreshed.

    Args:
        factors: ``"kronecker"`` (KFAC factors ``A, G``) or ``"trace_restricted"``
            (``Φ, Ψ, δ`` of TKFAC), docs/design.md §2(a).
        scaling: ``"kronecker"`` (products of factor eigenvalues) or ``"corrected"``
            (EKFAC second moments in the eigenbasis), docs/design.md §2(b).
        damping: λ for ``"eigenvalue"`` and ``"pi"`` damping, γ for ``"trace_relative"``.
        damping_type: ``"eigenvalue"`` (``1/(S+λ)``), ``"pi"`` (factored Tikhonov damping of
            Martens & Grosse 2015, Kronecker scaling only) or ``"trace_relative"``
            (``λ_l = max(γ·tr(F̂_l)/p_l, damping_floor)``), docs/design.md §3.
        damping_floor: lower bound of the trace-relative damping (ignored otherwise).
        fisher: ``"mc"`` (true Fisher, labels sampled from the model) or ``"empirical"``.
        loss: the training loss, which fixes the MC sampling distribution: ``"cross_entropy"``
            (categorical, from logits), ``"nll"`` (categorical, from the log-probabilities of
            a model that ends in ``log_softmax``), ``"mse"`` (Gaussian of variance ½) or
            ``"bce_with_logits"`` (Bernoulli). Ignored by the empirical Fisher.
        reduction: how the training loss reduces over the batch, ``"mean"`` or ``"sum"``.
        stat_decay: EMA weight of the old statistics, in ``[0, 1)``.
        cov_update_freq: steps between factor (and δ) updates.
        eigen_update_freq: steps between eigendecompositions.
        scale_update_freq: steps between corrected-scaling updates (ignored by Kronecker
            scaling).
        factor_dtype: dtype of statistics and eigendecompositions; ``None`` uses the
            parameters' dtype.
        basis_refresh_freq: steps between cheap refreshes of the eigenbases between full
            eigendecompositions (one power-iteration step from the previous basis and a QR,
            docs/design.md §4.2); ``None`` (default): full eigendecompositions only.
        basis_rank: keep only this many eigenvectors of a dense side wider than it, with one
            trace-preserving value for the rest of its spectrum (tekfac.truncation); ``None``
            (default) keeps every eigenvector.
        max_factor_dim: a side of a block wider than this keeps only the diagonal of its
            factor (with a warning naming the layer): an eigendecomposition costs ``d³`` and
            its factor ``d²`` memory. ``None`` keeps every factor whole.
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
    basis_refresh_freq: int | None = None
    basis_rank: int | None = None
    max_factor_dim: int | None = 8192

    def __post_init__(self) -> None:
        check_choice("factors", self.factors, FACTOR_KINDS)
        check_choice("scaling", self.scaling, SCALING_KINDS)
        check_choice("damping_type", self.damping_type, DAMPING_KINDS)
        check_choice("fisher", self.fisher, FISHER_KINDS)
        check_choice("loss", self.loss, LIKELIHOODS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_number("damping", self.damping, 0.0, low_open=True)
        check_number("damping_floor", self.damping_floor, 0.0)
        check_number("stat_decay", self.stat_decay, 0.0, 1.0, high_open=True)  # 1: frozen
        for name in ("cov_update_freq", "eigen_update_freq", "scale_update_freq"):
            check_positive_int(name, getattr(self, name))
        for name in ("basis_refresh_freq", "basis_rank", "max_factor_dim"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if (DAMPING_KINDS[self.damping_type].needs_factor_eigenvalues
                and not SCALING_KINDS[self.scaling].factor_eigenvalues):
            raise ValueError(f"Invalid damping_type: {self.damping_type!r} damps the factors, so "
                             "it needs Kronecker eigenvalues (KFAC or TKFAC); use 'eigenvalue' "
                             "or 'trace_relative' damping with EKFAC/TEKFAC")
        dtype = self.factor_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Invalid factor_dtype: {self.factor_dtype!r}; expected a floating "
                            "torch.dtype such as torch.float32, or None")

    @property
    def method(self) -> str:
        """The name of the method of these kinds (``"TEKFAC"``)."""
        return method_name(self.factors, self.scaling)

    def check_same_method(self, factors: str | None, scaling: str | None) -> None:
        """``ValueError`` unless the factor and scaling kinds of a checkpoint (``None``: not
        recorded, as in release 0.1.0) are this configuration's."""
        theirs = (factors or self.factors, scaling or self.scaling)
        if theirs != (self.factors, self.scaling):
            raise ValueError(
                f"state_dict was saved by {method_name(*theirs)} ({theirs[0]} factors, "
                f"{theirs[1]} scaling), but this optimizer is "
                f"{method_name(self.factors, self.scaling)} ({self.factors} factors, "
                f"{self.scaling} scaling): its statistics mean something else here; resume "
                "with the method that saved it")

    @classmethod
    def for_method(cls, method: str, **options: object) -> CurvatureConfig:
        """Build the configuration of a named method (``"kfac"``, ``"ekfac"``, ...)."""
        key = method.lower() if isinstance(method, str) else method
        if key not in METHODS:
            check_choice("method", method, METHODS)
        valid = [f.name for f in dataclasses.fields(cls) if f.name not in ("factors", "scaling")]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown}; valid options are {valid}")
        factors, scaling = METHODS[key]
        return cls(factors=factors, scaling=scaling, **options)  # type: ignore[arg-type]
