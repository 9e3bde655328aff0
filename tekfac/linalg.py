"""Robust symmetric eigendecomposition, and its cheap refresh (docs/design.md §4.2)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

#: Relative jitter added to the diagonal on the float64 retry.
JITTER = 1e-10
#: Threads of a CPU eigendecomposition (``None``: torch's setting). LAPACK's ``syevd`` is a
#: long chain of small parallel regions: on a CPU that other processes also use, each of them
#: waits for a descheduled thread, which made 512² decompositions 4–90× slower on 2 cores
#: (benchmarks/slow_steps.py, issue #15); on one thread they cost 1.3–1.5× an idle 2-thread run.
EIGH_THREADS: int | None = 1


def symmetric_eigh(matrix: Tensor, on_retry: Callable[[], None] | None = None
                   ) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (clamped at zero, ascending) and orthonormal eigenvectors of a symmetric
    positive semi-definite ``(d, d)`` matrix, in its dtype.

    ``torch.linalg.eigh`` is tried in the matrix's dtype; if it fails or returns non-finite
    values, ``on_retry()`` is called and it is retried in float64 after adding
    ``JITTER · mean(diag)`` to the diagonal. Returns ``None`` when that fails too or the input
    itself is not finite, so the caller can keep its previous basis. On CPU it runs on
    :data:`EIGH_THREADS` threads.
    """
    if not bool(torch.isfinite(matrix).all()):
        return None
    sym = (matrix + matrix.T) / 2
    with _threads(EIGH_THREADS if matrix.device.type == "cpu" else None):
        result = _try_eigh(sym)
        if result is None:
            if on_retry is not None:
                on_retry()
            wide = sym.double()
            jitter = JITTER * wide.diagonal().abs().mean().clamp(min=1e-30)
            result = _try_eigh(wide + jitter * torch.eye(len(wide), dtype=wide.dtype,
                                                         device=wide.device))
    if result is None:
        return None
    values, vectors = result
    return values.clamp(min=0).to(matrix.dtype), vectors.to(matrix.dtype).contiguous()


def _try_eigh(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        return None
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return None
    return values, vectors


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (unchanged for ``None``) inside."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(before)


def power_iteration_refresh(matrix: Tensor, basis: Tensor) -> tuple[Tensor, Tensor] | None:
    """An eigenbasis of the symmetric ``(d, d)`` ``matrix`` refreshed from its previous
    ``basis`` by one step of orthogonal iteration, as SOAP does: order the columns of ``U`` by
    their Rayleigh quotients ``diag(Uᵀ M U)``, largest first, then ``Q R = M U``. Returns the
    Rayleigh quotients ``diag(Qᵀ M Q)`` clamped at zero (the eigenvalue estimates) and ``Q``,
    in the matrix's dtype; ``None`` if the input or the result is not finite. The result is
    exact when ``basis`` already diagonalises ``matrix``. It costs three ``d × d`` products and
    a QR: on our CPU (one thread) 1.0–1.5× a full ``eigh``, so it buys accuracy between full
    decompositions, not time (``benchmarks/basis_refresh.py``); GPU ``eigh`` is the slow case
    it is meant for (not measured yet).
    """
    if not bool(torch.isfinite(matrix).all()):
        return None
    rayleigh = ((matrix @ basis) * basis).sum(dim=0)
    ordered = basis[:, torch.argsort(rayleigh, descending=True)]
    with _threads(EIGH_THREADS if matrix.device.type == "cpu" else None):
        q, _ = torch.linalg.qr(matrix @ ordered)
    values = ((matrix @ q) * q).sum(dim=0)
    if not bool(torch.isfinite(q).all() & torch.isfinite(values).all()):
        return None
    return values.clamp(min=0), q.contiguous()
