"""Scheduling policies: measured on the demo job with 2 workers, simulated for VGG16 and
ResNet50 at 32x32 on 2-64 workers.

Measured: the demo job's distillation phase (`distill.makespan_s`) under each policy, in
one run directory (teacher and cache built once; blocks trained again every time; 1
thread per worker; fine-tuning skipped). Simulated: each model's student-block training
steps timed on this CPU with random activations of the blocks' shapes (1 process, 1
thread; CIFAR-10-sized data: 45,000 training and 5,000 validation samples, the epochs and
batch of jobs/vgg16.toml and jobs/resnet50.toml), the cache read rate and the allreduce
taken from the profile.json the measured work-stealing run wrote (`profile.timed_shape_profile`),
then each policy simulated (`simulate.py`, the coordinator's own Scheduler). Ratios are to
the lower bound with splitting allowed. The model profiles are saved next to the run so
`python -m pbkd_mpi simulate RUN_DIR/vgg16-profile.json` reproduces the tables.
Prints one JSON object, last line.

    python benchmarks/policies.py [--run-dir /tmp/bench] [--workers 2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedup import DEFAULT_JOB, REPO, run  # noqa: E402

sys.path.insert(0, str(REPO))  # this process imports pbkd_mpi too (the profiles)

POLICIES = ("round-robin", "static-lpt", "work-stealing")
MODELS = {  # model: (keras.applications name, job file with its distill settings)
    "vgg16": ("VGG16", REPO / "jobs" / "vgg16.toml"),
    "resnet50": ("ResNet50", REPO / "jobs" / "resnet50.toml"),
}
CIFAR10 = {"train": 45000, "val": 5000}


def model_profile(model: str, reference: dict) -> dict:
    import keras

    from pbkd_mpi.config import load_job
    from pbkd_mpi.devices import configure_tensorflow_choice, import_tensorflow
    from pbkd_mpi.graph import flatten_model
    from pbkd_mpi.plan import granularity_of
    from pbkd_mpi.profile import timed_shape_profile

    import_tensorflow()
    configure_tensorflow_choice(1, 0)  # as one worker with 1 thread
    name, job_file = MODELS[model]
    job = load_job(job_file)
    teacher = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3),
                                                classes=10)
    item = 2 if job.cache.dtype == "float16" else 4
    return timed_shape_profile(flatten_model(teacher), granularity_of(job.blocks),
                               job.student.depth_multiplier, job.distill.batch_size,
                               job.distill.epochs, {**CIFAR10, "item_bytes": item}, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(DEFAULT_JOB))
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--workers", default="2,4,8,16,32,64")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="pbkd-bench-"))
    workers = [int(w) for w in args.workers.split(",")]
    if not (run_dir / "report.json").exists():
        run(3, args.job, run_dir)  # warm-up: trains the teacher, builds the cache
    measured, reports = {}, {}
    for policy in POLICIES:
        reports[policy] = run(3, args.job, run_dir, ["--set", f"schedule.policy={policy}"])
        measured[policy] = round(reports[policy]["distill"]["makespan_s"], 2)
        print(f"{policy}: distill makespan {measured[policy]} s", file=sys.stderr, flush=True)
        if policy == "work-stealing":  # its profile: the machine's read rate and allreduce
            reference = json.loads((run_dir / "profile.json").read_text())

    from pbkd_mpi import atomic
    from pbkd_mpi.simulate import render_table, simulate_profile

    simulated, tables = {}, {}
    for model in MODELS:
        profile = model_profile(model, reference)
        path = run_dir / f"{model}-profile.json"
        atomic.write_text(path, json.dumps(profile, indent=2) + "\n")
        table = simulate_profile(profile, workers)
        tables[model] = table
        simulated[model] = {str(w): {name: round(row["ratio"], 3)
                                     for name, row in table[w]["policies"].items()}
                            for w in workers}
        print(render_table(table, f"{model} at 32x32 ({path})"), file=sys.stderr)
    print(json.dumps({
        "measured": measured,
        "measured_lower_bound_s": {p: round(r["distill"]["lower_bound_s"], 2)
                                   for p, r in reports.items()},
        "measured_profile_s": round(reports["work-stealing"]["phases"]["profile"], 2),
        "simulated": simulated,
        "simulated_makespan_s": {m: {str(w): {n: round(row["makespan_s"], 1)
                                              for n, row in t[w]["policies"].items()}
                                     for w in workers} for m, t in tables.items()},
        "simulated_split": {m: {str(w): t[w]["policies"]["work-stealing+split"]["split"]
                                for w in workers} for m, t in tables.items()},
        "workers_measured": 2,
        "threads_per_worker": 1,
    }))


if __name__ == "__main__":
    main()
