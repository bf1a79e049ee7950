"""Scheduling through the real protocol under mpiexec: stealing from a slow worker, and a
block split over two workers against the same block trained alone."""

import json
import os
import subprocess
import sys
import shutil
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


# The tiny job made smaller still: what is compared is one block's training, not accuracy.
SMALL = ["--set", "teacher.train_epochs=2", "--set", "data.demo_train=600",
         "--set", "distill.epochs=4", "--set", "finetune.epochs=0",
         "--set", "finetune.loss=cross-entropy",  # no teacher logits needed for 0 epochs
         "--set", "accept.max_drop=1.0", "--set", "export.saved_model=false",
         "--set", "export.tflite=none"]  # neither acceptance's retraining nor exports


def test_a_block_split_over_two_workers_learns_what_it_learns_alone(tmp_path):
    from ..conftest import TINY_JOB, run_mpi

    run_dir = tmp_path / "run"
    split = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir, *SMALL,
                        "--set", 'schedule.split_blocks=["conv2=2"]'], timeout=240)
    assert split.returncode == 0, split.stderr[-3000:]
    split_report = json.loads((run_dir / "report.json").read_text())
    shutil.rmtree(run_dir / "blocks")  # train every block again, conv2 alone this time
    alone = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir, *SMALL,
                        "--set", "schedule.profile=false"], timeout=240)  # not needed here
    assert alone.returncode == 0, alone.stderr[-3000:]
    alone_report = json.loads((run_dir / "report.json").read_text())

    assert split_report["schedule"]["split"] == {"conv2": 2}
    (task,) = [t for t in split_report["schedule"]["tasks"] if t["name"] == "conv2"]
    assert sorted(task["ranks"]) == [1, 2] and task["replicas_identical"] is True
    assert alone_report["schedule"]["split"] == {}
    a, b = ({r["name"]: r for r in rep["blocks"]}["conv2"] for rep in (alone_report, split_report))
    relative = {name: row["val_mse"] / row["target_variance"]
                for name, row in (("alone", a), ("split", b))}
    # Same global batch, start, data and epochs; what differs is BN's statistics over half
    # batches and the order of samples. Both must improve on the start, and end close.
    for row in (a, b):
        assert row["val_mse"] < row["initial_val_mse"]
    assert abs(relative["split"] - relative["alone"]) <= 0.25 * relative["alone"], relative
