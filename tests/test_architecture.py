"""The package's layering: every library module imports only modules before it in
:data:`ORDER` (type-only imports included), so the import graph has no cycle, and the core
never imports the benchmark suite or the command line (docs/design.md §5)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "tekfac"

#: The core modules, each importing only modules before it.
ORDER = ["guards", "sharding", "truncation", "chunks", "patch_moments", "layers", "records",
         "capture", "factors", "scaling", "state", "damping", "fisher", "linalg", "profiling",
         "config", "schedule", "curvature", "damping_adaptation", "quadratic", "distributed",
         "statistics", "estimates", "preconditioner", "optim", "__init__"]


def imported(path: Path) -> set[str]:
    """The ``tekfac`` modules a file imports anywhere (``tekfac.x.y`` as ``x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "tekfac":
                names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("tekfac.")}
    return names


def test_every_core_module_is_in_the_order():
    core = {p.stem for p in PACKAGE.glob("*.py")} - {"cli", "__main__"}
    assert core == set(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_imports_only_earlier_modules(module):
    earlier = set(ORDER[:ORDER.index(module)])
    later = imported(PACKAGE / f"{module}.py") - earlier
    assert not later, f"tekfac/{module}.py imports {sorted(later)}, which come after it"
