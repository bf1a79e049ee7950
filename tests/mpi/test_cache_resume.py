"""A cache build killed mid-write resumes: complete shards are kept, the rest rebuilt."""

import json
import os
import subprocess
import sys

from ..conftest import REPO

DRIVER = REPO / "tests" / "mpi" / "cache_driver.py"


def _build(out, env=None):
    return subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, str(DRIVER), str(out), "--verify"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_a_build_killed_mid_write_reuses_its_complete_shards(tmp_path):
    # 540 training + 60 validation samples in shards of 64: 9 + 1 shards, 5 per rank.
    # Rank 1 dies (SIGKILL) half-way through writing its 2nd shard.
    killed = _build(tmp_path, {"PBKD_FAULT": "killwrite:1:2"})
    assert killed.returncode != 0, killed.stdout
    folder = tmp_path / "activations.shards"
    complete = sorted(p.name for p in folder.glob("[!.]*.h5"))
    half_written = list(folder.glob(".*.tmp*"))
    assert half_written, "the killed rank should have left its temporary file"
    assert "train-00001.h5" in complete  # rank 1's first shard made it
    assert "train-00003.h5" not in complete  # the one it died in did not
    assert not (tmp_path / "activations.h5").exists()

    resumed = _build(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["shards"] == 10
    assert report["reused"] == len(complete) and report["built"] == 10 - len(complete)
    assert report["max_relative_error"] < 1e-3  # fp16 of what the teacher computes
    assert not list(folder.glob(".*.tmp*"))
