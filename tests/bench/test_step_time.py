"""Smoke test of ``benchmarks/step_time.py``: its ``--json`` report on the tiny digits task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_time.py"


def test_json_report_has_every_figure():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tasks", "digits-mlp",
                          "--optimizers", "sgd", "tekfac", "--json"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    report = json.loads(out.strip().splitlines()[-1])["digits-mlp"]
    assert set(report) == {"sgd", "tekfac"}
    for row in report.values():
        assert set(row) == {"step_ms", "ratio_vs_sgd", "floor_ratio", "peak_mb"}
        assert row["step_ms"] > 0 and row["peak_mb"] > 0
    assert report["sgd"]["ratio_vs_sgd"] == 1.0 and report["sgd"]["floor_ratio"] == 1.0
    assert report["tekfac"]["floor_ratio"] > 1.0  # rotations and statistics on top of SGD
    assert report["tekfac"]["peak_mb"] > report["sgd"]["peak_mb"]  # factors and bases
