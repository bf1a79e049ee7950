"""Data-parallel training under real MPI: weights bit-identical on every rank, and 2 ranks
learn as well as 1 (tests/mpi/data_parallel_driver.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pbkd_mpi.mpi.data_parallel import batch_pieces


pytestmark = pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec on PATH")

DRIVER = Path(__file__).with_name("data_parallel_driver.py")
REPO = Path(__file__).resolve().parents[2]


def _run(ranks: int, mode: str, out: Path) -> dict:
    command = ["mpiexec", "-n", str(ranks), sys.executable, str(DRIVER), str(out), mode, "5",
               "3e-3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_pieces_of_each_batch_are_disjoint_and_cover_the_epoch():
    order = np.random.default_rng(0).permutation(103)
    seen = []
    for step in range(-(-103 // 20)):
        pieces = batch_pieces(order, step, 20, 3)
        assert len(pieces) == 3
        assert all(np.all(np.diff(p) > 0) for p in pieces)  # sorted, for h5py
        seen.extend(np.concatenate(pieces))
    assert sorted(seen) == list(range(103))


def test_two_ranks_keep_identical_weights_and_learn_like_one(tmp_path):
    one = _run(1, "ce", tmp_path / "one.json")
    two = _run(2, "ce", tmp_path / "two.json")
    # Each rank started from its own random weights: the broadcast and the averaged
    # gradients must leave every rank with the very same bytes.
    assert len(two["digests"]) == 2 and two["digests"][0] == two["digests"][1]
    assert two["local_samples"][0] == 600  # half of the 1200 training images each epoch
    # Same global batch, so the same trajectory up to round-off and per-rank BN statistics.
    assert one["metric"][-1] > 0.7, one  # the task is learnable (chance is 0.25)
    assert abs(two["metric"][-1] - one["metric"][-1]) <= 0.05, (one["metric"], two["metric"])
    assert two["losses"][-1] <= 1.1 * one["losses"][-1]


def test_two_ranks_regress_a_block_output_with_mse(tmp_path):
    two = _run(2, "mse", tmp_path / "mse.json")
    assert two["digests"][0] == two["digests"][1]
    assert two["metric"][-1] < 0.9 * two["metric"][0], two["metric"]  # validation MSE falls
