"""Robust symmetric eigendecomposition (docs/design.md §4.2)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative jitter added to the diagonal on the float64 retry.
JITTER = 1e-10


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (clamped at zero, ascending) and orthonormal eigenvectors of a symmetric
    positive semi-definite ``(d, d)`` matrix, in its dtype.

    ``torch.linalg.eigh`` is tried in the matrix's dtype; if it fails or returns non-finite
    values, it is retried in float64 after adding ``JITTER · mean(diag)`` to the diagonal.
    Returns ``None`` when that fails too or the input itself is not finite, so the caller can
    keep its previous basis.
    """
    if not bool(torch.isfinite(matrix).all()):
        return None
    sym = (matrix + matrix.T) / 2
    result = _try_eigh(sym)
    if result is None:
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
