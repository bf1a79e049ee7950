"""Scheduling through the real protocol under mpiexec: stealing from a slow worker. (A block
split over two workers is tested in test_end_to_end.py, from the tiny run's teacher.)"""

import os
import subprocess
import sys
from collections import Counter

from ..conftest import REPO
from .test_protocol import json_objects

DRIVER = REPO / "tests" / "mpi" / "schedule_driver.py"


def test_idle_workers_steal_the_slow_workers_queue():
    # 3 workers, 12 tasks of 0.1 s, rank 1 five times slower: each queue starts with 4
    # tasks. Without stealing rank 1 would need 2.0 s; with it, ranks 2 and 3 take over
    # most of rank 1's queue and the run ends far sooner.
    result = subprocess.run(
        ["mpiexec", "-n", "4", sys.executable, str(DRIVER), "12", "0.1", "5"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = json_objects(result.stdout)
    (summary,) = [line for line in lines if line["role"] == "coordinator"]
    workers = {line["rank"]: line["executed"] for line in lines if line["role"] == "worker"}
    assert {name: len(q) for name, q in summary["queues"].items()} == {"1": 4, "2": 4, "3": 4}
    executions = Counter(i for executed in workers.values() for i in executed)
    assert sorted(executions) == list(range(12)) and set(executions.values()) == {1}
    slow_queue = summary["queues"]["1"]
    stolen = [name for name in slow_queue if summary["ran"][name] != 1]
    assert len(stolen) >= 2, summary  # rank 1 ran at most 2 of its own 4
    assert len(workers[1]) <= 2
    assert summary["makespan_s"] < 1.6  # rank 1 alone with its queue: 2.0 s
    # Measured times corrected the estimates of tasks handed out later.
    assert max(summary["estimated"].values()) > 0.1 + 1e-9



def test_tasks_added_by_rank_0s_follow_up_join_the_running_schedule():
    # 2 workers, 6 tasks of 0.3 s; rank 0 works 0.05 s on each result (acceptance's
    # scoring) and adds a task for every even-numbered one (a wider retrain): 9 in all.
    result = subprocess.run(
        ["mpiexec", "-n", "3", sys.executable, str(DRIVER), "6", "0.3", "1", "follow"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = json_objects(result.stdout)
    (summary,) = [line for line in lines if line["role"] == "coordinator"]
    executed = Counter(i for line in lines if line["role"] == "worker"
                       for i in line["executed"])
    assert sorted(executed) == [0, 1, 2, 3, 4, 5, 100, 102, 104]
    assert set(executed.values()) == {1}
    assert sorted(summary["ran"]) == sorted([f"t{i:02d}" for i in range(6)]
                                            + ["t00+more", "t02+more", "t04+more"])
    # Every result was worked on, the first ones while tasks still ran on the workers.
    assert len(summary["steps_s"]) == 6
    last_planned_end = max(summary["ended_s"][f"t{i:02d}"] for i in range(6))
    assert summary["steps_s"][0] < last_planned_end
    # An added task went ahead of planned ones estimated shorter: it started well before
    # the last planned task ended (appended behind them, it would start about then).
    assert summary["started_s"]["t00+more"] < last_planned_end - 0.15, summary
