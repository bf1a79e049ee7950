"""Distillation phase with 1 worker vs 2 workers on the same job, measured in one run.

All runs share one run directory, so they reuse the teacher and the activation cache; the
finished blocks are removed before each measured run so every block trains again. Each
worker gets 1 intra-op thread, so the comparison is of worker processes, not of threads.
The figure compared is each run's `distill.makespan_s` from report.json. Prints one JSON
object, last line.

    python benchmarks/distill_workers.py [--job jobs/tiny.toml] [--run-dir /tmp/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(ranks: int, job: str, run_dir: Path, extra) -> dict:
    shutil.rmtree(run_dir / "blocks", ignore_errors=True)  # train every block again
    command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "pbkd_mpi", "run", job,
               "--run-dir", str(run_dir), "--set", "run.threads=1", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(REPO / "jobs" / "tiny.toml"))
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="pbkd-bench-"))
    extra = [item for pair in (("--set", s) for s in args.set) for item in pair]
    run(2, args.job, run_dir, extra)  # warm-up: trains the teacher, builds the cache
    one = run(2, args.job, run_dir, extra)
    two = run(3, args.job, run_dir, extra)
    t1, t2 = one["distill"]["makespan_s"], two["distill"]["makespan_s"]
    print(json.dumps({
        "job": args.job,
        "blocks": len(one["blocks"]),
        "makespan_1_worker_s": round(t1, 2),
        "makespan_2_workers_s": round(t2, 2),
        "speedup": round(t1 / t2, 3),
        "efficiency": round(t1 / (2 * t2), 3),
        "sum_task_s_1_worker": round(one["distill"]["sum_task_s"], 2),
        "sum_task_s_2_workers": round(two["distill"]["sum_task_s"], 2),
        "coordinator_cpu_fraction": round(two["distill"]["coordinator_cpu_fraction"], 4),
        "threads_per_worker": 1,
    }))


if __name__ == "__main__":
    main()
