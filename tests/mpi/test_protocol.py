"""The task protocol under load: every task ends exactly once, as done or as failed."""

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from ..conftest import REPO

SCRIPT = REPO / "tests" / "mpi" / "protocol_load.py"


def json_objects(text: str) -> list:
    """Every JSON object printed, also when the launcher joined two ranks' lines into one."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        value, at = decoder.raw_decode(text, at)
        out.append(value)
    return out


# The default plan is work-stealing; the fixed policies retry a failed task from another
# worker's queue instead of any idle worker's.
@pytest.mark.parametrize("ranks, count, policy", [(4, 500, ""), (3, 200, ""),
                                                  (4, 200, "round-robin")])
def test_every_task_ends_exactly_once(ranks, count, policy):
    result = subprocess.run(
        ["mpiexec", "-n", str(ranks), sys.executable, str(SCRIPT), str(count), "7",
         *([policy] if policy else [])],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = json_objects(result.stdout)
    (summary,) = [line for line in lines if line["role"] == "coordinator"]
    workers = [line for line in lines if line["role"] == "worker"]
    assert sorted(w["rank"] for w in workers) == list(range(1, ranks))

    names = {f"t{i}" for i in range(count)}
    done, failed = set(summary["done"]), set(summary["failed"])
    assert done | failed == names and not done & failed
    assert summary["results_ok"]
    # Always-failing tasks fail, after 3 tries; odd-rank failures are rescued elsewhere.
    assert failed == {f"t{i}" for i in range(0, count, 10)}
    assert all(len(ranks_tried) == 3 for ranks_tried in summary["failed"].values())
    executions = Counter(i for w in workers for i in w["executed"])
    for name in names:
        index = int(name[1:])
        tries = 3 if name in failed else None
        if tries:
            assert executions[index] == tries
        else:
            assert 1 <= executions[index] <= 3  # 1 plus one per failed try on an odd rank
    # Successful tasks ran exactly once more than they failed: nothing lost or doubled.
    assert sum(executions.values()) == len(done) + sum(
        1 for w in workers for i in w["executed"]
        if i % 10 == 0 or (i % 10 == 1 and w["rank"] % 2 == 1))
    assert summary["cpu_fraction"] < 0.5
    # The collective phase after the tasks: every rank, rank 0 included, summed the ranks.
    assert summary["phase_values"] == [sum(range(ranks))] * ranks
    # A phase on workers 2.. alone: their own communicator (ranks 0.. within it), rank 0
    # and worker 1 answer None, and each computing worker's progress event reached rank 0.
    computing = ranks - 2
    assert summary["subset_values"] == [None, None] + [sum(range(computing))] * computing
    assert summary["events"] == [[rank, ["summing", rank - 2]] for rank in range(2, ranks)]


FINALIZE_SCRIPT = """
import sys, time
from mpi4py import MPI
from pbkd_mpi.mpi.preemption import finalize_within
if MPI.COMM_WORLD.Get_rank() == 1:
    time.sleep(600)  # a rank that never reaches MPI_Finalize
print("rank 0 finalizing", flush=True)
finalize_within(2.0)
print("rank 0 finalized", flush=True)
"""


def test_a_rank_that_never_finalizes_does_not_hang_the_others():
    """MPICH's MPI_Finalize waits for every rank with the GIL held; the bounded finalize
    ends the waiting rank, and the launcher then ends the stuck one."""
    started = time.monotonic()
    result = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", FINALIZE_SCRIPT],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    assert "rank 0 finalizing" in result.stdout and "rank 0 finalized" not in result.stdout
    assert "Timeout (0:00:02)" in result.stderr and "finalize_within" in result.stderr
