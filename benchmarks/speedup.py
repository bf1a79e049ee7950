"""Distillation phase with 2 workers vs 1 worker, and the hardware's own ceiling, in one run.

Every run shares one run directory, so they reuse the teacher and the activation cache;
finished blocks are removed before each measured run so every block trains again, and
fine-tuning is skipped (it is not what is measured). Each worker gets 1 intra-op thread,
so the comparison is of worker processes, not of threads. The tool's figure is each run's
`distill.makespan_s` from report.json (profiling is its own phase, reported separately).

The ceiling: the same block tasks (built as the pipeline builds them from the run
directory) run by two plain Python processes at once, no MPI and no coordinator, each
training its half one task after another; the halves are the best two-way split of the
1-worker run's measured task times. `ceiling_ratio` = the tool's 2-worker makespan /
the slower half's wall time (1.0: the tool adds nothing to what the hardware does).
Prints one JSON object, last line.

    python benchmarks/speedup.py [--job jobs/demo.toml] [--run-dir /tmp/bench]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JOB = REPO / "jobs" / "demo.toml"
# Not what these benchmarks measure: skipped so each measured run costs its distillation.
NO_FINETUNE = ("--set", "finetune.epochs=0", "--set", "finetune.loss=cross-entropy")


def run(ranks: int, job: str, run_dir: Path, extra=()) -> dict:
    """One run of the tool on `ranks` MPI ranks (1 thread per worker), every block trained
    again; returns its report.json."""
    shutil.rmtree(run_dir / "blocks", ignore_errors=True)  # train every block again
    command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "pbkd_mpi", "run", str(job),
               "--run-dir", str(run_dir), "--set", "run.threads=1", *NO_FINETUNE, "--quiet",
               *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "report.json").read_text())


def block_tasks(run_dir: Path) -> dict:
    """The run's block tasks as the pipeline builds them (same blocks, seeds, starting
    weights, cache), from its job.toml, report.json and files."""
    import h5py

    from pbkd_mpi.config import load_job
    from pbkd_mpi.model.graph import flatten_model
    from pbkd_mpi.model.selection import granularity_of, select_blocks
    from pbkd_mpi.model.students import initial_weights
    from pbkd_mpi.model.teacher import load_model_file
    from pbkd_mpi.distill.train_block import BlockTask

    job = load_job(run_dir / "job.toml")
    report = json.loads((run_dir / "report.json").read_text())
    teacher = flatten_model(load_model_file(report["teacher"]["file"]))
    multiplier = job.student.depth_multiplier
    blocks = select_blocks(teacher, granularity_of(job.blocks), multiplier, job.student.family,
                           job.student.width_multiplier, job.student.family_overrides)
    cache = report["cache"]["path"]
    with h5py.File(cache, "r") as f:
        fingerprint = str(f.attrs["fingerprint"])
    return {b.name: BlockTask(b, cache, fingerprint, job.distill, job.run.seed, 0.0,
                              depth_multiplier=multiplier,
                              initial_weights=initial_weights(b, teacher, multiplier))
            for b in blocks}


def ceiling_worker(run_dir: str, names: str) -> None:
    """One half of the ceiling: train these blocks one after another, 1 thread, no MPI.
    Says "ready" once set up and starts on "go" from stdin, so both halves start together."""
    from pbkd_mpi.mpi.devices import configure_tensorflow_choice, import_tensorflow

    import_tensorflow()
    configure_tensorflow_choice(1, 0)
    from pbkd_mpi.distill.train_block import train_block

    tasks = block_tasks(Path(run_dir))
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    seconds = {}
    for name in names.split(","):
        begun = time.perf_counter()
        train_block(tasks[name])
        seconds[name] = time.perf_counter() - begun
    print(json.dumps({"wall_s": time.perf_counter() - started, "tasks": seconds}), flush=True)


def best_halves(seconds: dict) -> tuple[list, list]:
    """The two-way split of the tasks whose larger half is smallest (exhaustive)."""
    names = sorted(seconds)
    best = None
    for size in range(len(names) + 1):
        for left in itertools.combinations(names, size):
            right = [n for n in names if n not in left]
            longer = max(sum(seconds[n] for n in left), sum(seconds[n] for n in right))
            if best is None or longer < best[0]:
                best = (longer, list(left), right)
    return best[1], best[2]


def ceiling(run_dir: Path, seconds: dict) -> dict:
    halves = best_halves(seconds)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "--ceiling-worker", str(run_dir),
                               ",".join(half)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
             for half in halves if half]
    for proc in procs:
        while proc.stdout.readline().strip() != "ready":
            if proc.poll() is not None:
                raise RuntimeError("a ceiling process ended before it was ready")
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a ceiling process failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {"halves": halves, "wall_s": [r["wall_s"] for r in results],
            "seconds": max(r["wall_s"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(DEFAULT_JOB))
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--ceiling-worker", nargs=2, metavar=("RUN_DIR", "BLOCKS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_worker:
        ceiling_worker(*args.ceiling_worker)
        return
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="pbkd-bench-"))
    if not (run_dir / "report.json").exists():
        run(3, args.job, run_dir)  # warm-up: trains the teacher, builds the cache
    one = run(2, args.job, run_dir)
    two = run(3, args.job, run_dir)
    t1, t2 = one["distill"]["makespan_s"], two["distill"]["makespan_s"]
    measured_alone = {t["name"]: t["measured_s"] for t in one["schedule"]["tasks"]}
    hardware = ceiling(run_dir, measured_alone)
    print(json.dumps({
        "job": str(args.job),
        "blocks": len(one["blocks"]),
        "makespan_1_worker_s": round(t1, 2),
        "makespan_2_workers_s": round(t2, 2),
        "speedup": round(t1 / t2, 3),
        "efficiency": round(t1 / (2 * t2), 3),
        "ceiling_s": round(hardware["seconds"], 2),
        "ceiling_halves": hardware["halves"],
        "ceiling_halves_s": [round(s, 2) for s in hardware["wall_s"]],
        "ceiling_ratio": round(t2 / hardware["seconds"], 3),
        "ceiling_speedup": round(t1 / hardware["seconds"], 3),
        "policy": two["schedule"]["policy"],
        "lower_bound_2_workers_s": round(two["distill"]["lower_bound_s"], 2),
        "profile_s": {"1_worker": round(one["phases"]["profile"], 2),
                      "2_workers": round(two["phases"]["profile"], 2)},
        "sum_task_s_1_worker": round(one["distill"]["sum_task_s"], 2),
        "sum_task_s_2_workers": round(two["distill"]["sum_task_s"], 2),
        "coordinator_cpu_fraction": round(two["distill"]["coordinator_cpu_fraction"], 4),
        "threads_per_worker": 1,
    }))


if __name__ == "__main__":
    main()
