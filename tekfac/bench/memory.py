"""Peak memory of live tensors while a function runs, the same quantity on CPU and CUDA."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch


def peak_allocated_mb(run: Callable[[], None], device: str) -> float:
    """Peak MiB of tensors allocated while ``run()`` runs: on CUDA ``max_memory_allocated``
    above the memory in use before; on CPU the maximum "Total Allocated" of the profiler's
    memory events (every allocation and free it records)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"),
               default=0) / 2**20
