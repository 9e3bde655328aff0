"""The peer comparison scripts (``benchmarks/peer_*.py``) keep running: tekfac's side of each,
for two steps on the real data (the peers themselves live in scratch environments)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_autoencoder  # a script folder, not a package
import peer_kfac_pytorch

pytestmark = pytest.mark.skipif(not Path(peer_autoencoder.DEFAULT_DATA).is_dir(),
                                reason="Fashion-MNIST is not installed")


def test_tekfac_side_runs_from_the_peers_initial_weights():
    """The quadratic rule's side (``--adaptive``), from kfac-pytorch's script's weights."""
    args = argparse.Namespace(
        data_dir=peer_autoencoder.DEFAULT_DATA, seed=0, steps=2, fisher="mc", method="tekfac",
        damping_type="eigenvalue", lr=1e-2, momentum=0.9, damping=1.0, norm_constraint=1e-2,
        schedule="warmup-cosine", stat_decay=0.95, eigen_every=5, stats_every=1,
        factor_dtype="float32", units="loss", adaptive=True)
    initial = peer_kfac_pytorch.initial_weights(0)
    losses, errors, updates = peer_autoencoder.run_tekfac(args, initial)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert errors[-1][0] == 2 and math.isfinite(errors[-1][1])
    assert len(updates[0]) == len(peer_autoencoder.WIDTHS) and all(u > 0 for u in updates[0])
