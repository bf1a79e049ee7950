"""Scheduling policies: measured on the demo job with 2 workers, simulated for VGG16 and
ResNet50 at 32x32 on 2-64 workers.

Measured: the demo job's distillation phase (`distill.makespan_s`) under each policy, in
one run directory (teacher and cache built once; blocks trained again every time; 1
thread per worker; fine-tuning skipped). Simulated: each model's student-block training
steps timed on this CPU with random activations of the blocks' shapes (1 process, 1
thread; CIFAR-10-sized data: 45,000 training and 5,000 validation samples, the epochs and
batch of jobs/vgg16.toml and jobs/resnet50.toml), the cache read rate and the allreduce
taken from a reference profile.json a measured run wrote (`timed_shape_profile` below),
then each policy simulated (`simulate.py`, the coordinator's own Scheduler). Ratios are to
the lower bound with splitting allowed (`schedule.lower_bound`: least work, the longest
task's shortest time and the per-worker packing limits). Sensitivity: the work-stealing+
split ratios again with every block's compute (steps and evaluation; not reads, setup or
the allreduce) scaled by each of `--scales` (`profile.scaled_profile`), so a result that
held only at the measured speeds would show.

The reference is the measured work-stealing run's profile.json (saved as
benchmarks/profiles/reference-profile.json); `--simulate-only` skips the measured runs and
takes that saved reference (or `--reference PATH`), still timing the student blocks here;
`--reuse-profiles` also skips the timing and simulates the saved model profiles. The model
profiles are saved as benchmarks/profiles/{vgg16,resnet50}-profile.json, so
`python -m pbkd_mpi simulate benchmarks/profiles/vgg16-profile.json --workers
2,4,8,16,32,64` reproduces a table. Prints one JSON object, last line.

    python benchmarks/policies.py [--run-dir /tmp/bench] [--workers 2,4,8,16,32,64]
    python benchmarks/policies.py --simulate-only [--reference RUN/profile.json]
    python benchmarks/policies.py --reuse-profiles
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedup import DEFAULT_JOB, REPO, run  # noqa: E402

from pbkd_mpi.model.selection import select_blocks
from pbkd_mpi.model.students import build_student_model
from pbkd_mpi.schedule.estimates import PROFILE_VERSION
from pbkd_mpi.cache.layout import pair_bytes
from pbkd_mpi.schedule.profiling import (TIMED_STEPS, WARMUP_STEPS, block_entry,
                                         time_student)


sys.path.insert(0, str(REPO))  # this process imports pbkd_mpi too (the profiles)


POLICIES = ("round-robin", "static-lpt", "work-stealing")
MODELS = {  # model: (keras.applications name, job file with its distill settings)
    "vgg16": ("VGG16", REPO / "jobs" / "vgg16.toml"),
    "resnet50": ("ResNet50", REPO / "jobs" / "resnet50.toml"),
}
CIFAR10 = {"train": 45000, "val": 5000}
PROFILES = REPO / "benchmarks" / "profiles"
REFERENCE = PROFILES / "reference-profile.json"
TARGET = 1.05  # the goal: work-stealing with splitting within this of the lower bound


def timed_shape_profile(teacher, granularity: str, depth_multiplier: int, batch_size: int,
                        epochs: int, samples: dict, reference: dict,
                        steps: int = TIMED_STEPS) -> dict:
    """A profile of `teacher`'s block tasks without its data or weights: each student
    block's training steps timed on this rank with random activations of the block's
    shapes (step time depends on shapes, not values), at `batch_size` and half of it; the
    cache read rate and the allreduce come from `reference`, a profile measured by a real
    run on this machine. For simulating models too large to distill here."""
    import keras
    import numpy as np

    rates = [b["read_bytes_per_s"] for b in reference["blocks"].values()
             if "read_bytes_per_s" in b]
    if not rates or not reference.get("allreduce"):
        raise SystemExit("the reference profile needs measured read rates and an allreduce "
                         "(a profile.json of a run with 2 or more workers and splitting on)")
    read_rate = float(np.median(rates))
    rng = np.random.default_rng(0)
    rows = (WARMUP_STEPS + steps) * batch_size
    blocks = {}
    for block in select_blocks(teacher, granularity, depth_multiplier):
        x = rng.standard_normal((rows, *block.input_shape), np.float32)
        y = rng.standard_normal((rows, *block.output_shape), np.float32)
        keras.utils.set_random_seed(0)
        build_started = time.perf_counter()
        model = build_student_model(block, depth_multiplier)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        batches = [(x[i:i + batch_size], y[i:i + batch_size])
                   for i in range(0, rows, batch_size)]
        timed = time_student(model, batches, steps, build_started)
        blocks[block.name] = block_entry(
            timed, batch_size, epochs, samples, pair_bytes(block, samples["item_bytes"]),
            read_rate, "timed steps on random activations of the block's shapes")
    return {
        "version": PROFILE_VERSION,
        "method": (f"timed student-block steps of {teacher.name} on this CPU (1 process, random "
                   f"activations of each block's shapes); cache read rate and allreduce from a "
                   f"measured run's profile; {samples['train']} training samples"),
        "workers": None,
        "allreduce": reference["allreduce"],
        "blocks": blocks,
    }


def model_profile(model: str, reference: dict) -> dict:
    import keras

    from pbkd_mpi.config import load_job
    from pbkd_mpi.mpi.devices import configure_tensorflow_choice, import_tensorflow
    from pbkd_mpi.model.graph import flatten_model
    from pbkd_mpi.model.selection import granularity_of

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


def measured_runs(args, run_dir: Path) -> tuple[dict, dict]:
    """Each policy on the demo job; returns (makespans, reports), and saves the
    work-stealing run's profile.json as the reference."""
    from pbkd_mpi import atomic

    if not (run_dir / "report.json").exists():
        run(3, args.job, run_dir)  # warm-up: trains the teacher, builds the cache
    measured, reports = {}, {}
    for policy in POLICIES:
        reports[policy] = run(3, args.job, run_dir, ["--set", f"schedule.policy={policy}"])
        measured[policy] = round(reports[policy]["distill"]["makespan_s"], 2)
        print(f"{policy}: distill makespan {measured[policy]} s", file=sys.stderr, flush=True)
        if policy == "work-stealing":  # its profile: the machine's read rate and allreduce
            atomic.write_text(REFERENCE, (run_dir / "profile.json").read_text())
    return measured, reports


def sensitivity(profile: dict, workers, scales) -> dict:
    """{scale: {workers: work-stealing+split's ratio to the bound}} on the scaled profile."""
    from pbkd_mpi.schedule.estimates import scaled_profile, task_estimates
    from pbkd_mpi.schedule.projection import simulate_estimates

    out = {}
    for scale in scales:
        scaled = scaled_profile(profile, scale)
        table = simulate_estimates(lambda w: task_estimates(scaled, w), workers,
                                   (("work-stealing", True),))
        out[f"{scale:g}"] = {str(w): round(table[w]["policies"]["work-stealing+split"]["ratio"], 3)
                             for w in workers}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(DEFAULT_JOB))
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--workers", default="2,4,8,16,32,64")
    parser.add_argument("--simulate-only", action="store_true",
                        help="skip the measured runs: time the student blocks against the "
                             "saved reference profile (or --reference)")
    parser.add_argument("--reference", default=None,
                        help="a measured run's profile.json (read rate and allreduce)")
    parser.add_argument("--reuse-profiles", action="store_true",
                        help="simulate the saved model profiles, timing nothing")
    parser.add_argument("--scales", default="0.25,0.5,2,4",
                        help="factors on the blocks' compute for the sensitivity table")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    measured = reports = None
    if not (args.simulate_only or args.reuse_profiles):
        run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="pbkd-bench-"))
        measured, reports = measured_runs(args, run_dir)

    from pbkd_mpi import atomic
    from pbkd_mpi.schedule.projection import render_table, simulate_profile

    reference = None
    if not args.reuse_profiles:
        reference = json.loads(Path(args.reference or REFERENCE).read_text())
    simulated, tables, sensitive = {}, {}, {}
    for model in MODELS:
        path = PROFILES / f"{model}-profile.json"
        if args.reuse_profiles:
            profile = json.loads(path.read_text())
        else:
            profile = model_profile(model, reference)
            atomic.write_text(path, json.dumps(profile, indent=2) + "\n")
        table = simulate_profile(profile, workers)
        tables[model] = table
        simulated[model] = {str(w): {name: round(row["ratio"], 3)
                                     for name, row in table[w]["policies"].items()}
                            for w in workers}
        print(render_table(table, f"{model} at 32x32 ({path.relative_to(REPO)})"),
              file=sys.stderr)
        sensitive[model] = sensitivity(profile, workers, scales)
        print(f"{model}: work-stealing+split / lower bound with the compute scaled: "
              + "; ".join(f"x{s}: max {max(r.values()):.3f}" for s, r in sensitive[model].items()),
              file=sys.stderr, flush=True)
    split_ratios = [r["work-stealing+split"] for m in simulated.values() for r in m.values()]
    scaled_ratios = [r for m in sensitive.values() for rows in m.values() for r in rows.values()]
    print(json.dumps({
        **({"measured": measured,
            "measured_lower_bound_s": {p: round(r["distill"]["lower_bound_s"], 2)
                                       for p, r in reports.items()},
            "measured_profile_s": round(reports["work-stealing"]["phases"]["profile"], 2),
            "workers_measured": 2, "threads_per_worker": 1} if measured else {}),
        "simulated": simulated,
        "simulated_makespan_s": {m: {str(w): {n: round(row["makespan_s"], 1)
                                              for n, row in t[w]["policies"].items()}
                                     for w in workers} for m, t in tables.items()},
        "simulated_lower_bound_s": {m: {str(w): round(t[w]["lower_bound_s"], 1) for w in workers}
                                    for m, t in tables.items()},
        "simulated_split": {m: {str(w): t[w]["policies"]["work-stealing+split"]["split"]
                                for w in workers} for m, t in tables.items()},
        "sensitivity": sensitive,
        "split_worst_ratio": round(max(split_ratios), 3),
        "split_worst_ratio_scaled": round(max(scaled_ratios), 3),
        "split_within_target": max(split_ratios) <= TARGET,
        "target": TARGET,
    }))


if __name__ == "__main__":
    main()
