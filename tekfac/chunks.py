"""How per-example work is cut into bounded pieces.

Statistics that need one tensor per example (unfolded patches, per-example gradients
``D_i``, a convolution's gathered input rows) are computed over consecutive ranges of
examples, each holding at most about :data:`CHUNK_ELEMENTS` elements, so that the whole
batch's tensor never exists at once (docs/design.md §5).
"""

from __future__ import annotations

#: Largest number of elements of a layer's patches, of per-example gradients, or of a
#: convolution's gathered input rows (``Y`` of :mod:`tekfac.patch_moments`) materialised at once.
CHUNK_ELEMENTS = 1 << 20


def example_ranges(n: int, elements_per_example: int) -> list[slice]:
    """Consecutive ranges of ``n`` examples, each of at most about :data:`CHUNK_ELEMENTS`
    elements (and at least one example)."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_example))
    return [slice(start, start + step) for start in range(0, n, step)]
