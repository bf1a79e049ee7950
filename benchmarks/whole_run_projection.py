"""The whole run of VGG16 and ResNet50 (32x32, CIFAR-10-sized data) projected at 1-64 workers.

No such run fits this machine, so each phase after the teacher is modelled from costs
measured here on one thread (as the saved block profiles were):

- the saved profiles (benchmarks/profiles/{vgg16,resnet50}-profile.json, benchmarks/
  policies.py): every block's timed training steps, simulated by the coordinator's own
  scheduler for `distill`;
- the teacher's and the student's forward pass per image (`predict_on_batch`, batch
  256) and the student's training step per image (`train_on_batch`, the fine-tuning
  batch), timed on models built without trained weights (time depends on shapes).

From those, at 1 worker, with the job file's settings (jobs/vgg16.toml,
jobs/resnet50.toml) and the default chained pass (`chained_epochs` 4, `parallel`):
cache = the teacher on every training and validation image, on the worker; profile =
each block's setup and timed steps; distill = the simulated makespan plus the solo
scores, which are tasks on the workers (a score: BN re-estimation on 2,000 training
images and the 5,000 validation images through the teacher); accept = nothing left after
distillation; chain =
the student's inputs on rank 0, every block but the first and last trained at once for
chained_epochs / epochs of its distillation time, then the last block with its own inputs;
assemble = BN re-estimation on 4,000 images; finetune = epochs x (training steps + a
validation pass), on the worker (rank 0 computes only beside a GPU of its own).
schedule/whole_run.py then projects every phase at
each worker count. Prints a table per model and, last, one JSON line
`{model: {workers: {"speedup", "sequential_share", "total_s"}}}`.

    python benchmarks/whole_run_projection.py [--workers 1,2,4,16,64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"vgg16": ("VGG16", REPO / "jobs" / "vgg16.toml"),
          "resnet50": ("ResNet50", REPO / "jobs" / "resnet50.toml")}
SAMPLES = {"train": 45000, "val": 5000}  # CIFAR-10-sized, as the saved profiles
PROFILES = REPO / "benchmarks" / "profiles"


def per_image(run, input_shape, batch: int) -> float:
    """Median seconds per image of `run(batch of random images)`, timed as the run's own
    latencies are (model/block_timing.time_callables)."""
    from pbkd_mpi.model.block_timing import time_callables

    return time_callables([run], input_shape, batch, rounds=5)[0] / 1000.0 / batch


def measured_costs(name: str, job) -> dict:
    """Seconds per image: teacher and student forward, student training step."""
    import keras
    import numpy as np

    from pbkd_mpi.model.assemble import assemble_student
    from pbkd_mpi.model.graph import flatten_model
    from pbkd_mpi.model.selection import job_blocks
    from pbkd_mpi.model.students import initial_weights

    teacher = flatten_model(getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=10))
    blocks = job_blocks(teacher, job)
    multiplier = job.student.depth_multiplier
    student = assemble_student(teacher, blocks,
                               {b.name: initial_weights(b, teacher, multiplier) for b in blocks},
                               multiplier)
    student.compile(optimizer=keras.optimizers.Adam(1e-3),
                    loss="sparse_categorical_crossentropy")
    labels = np.random.default_rng(0).integers(0, 10, job.finetune.batch_size)
    shape = (32, 32, 3)
    return {"teacher_forward_s": per_image(teacher.predict_on_batch, shape, 256),
            "student_forward_s": per_image(student.predict_on_batch, shape, 256),
            "student_train_s": per_image(lambda x: student.train_on_batch(x, labels), shape,
                                         job.finetune.batch_size),
            "blocks": [b.name for b in blocks]}


def modelled_phases(costs: dict, profile: dict, job, makespan_1: float) -> tuple:
    """(phases at 1 worker, the report's `chained`) from measured costs."""
    from pbkd_mpi.distill.score import CALIBRATION_SAMPLES
    from pbkd_mpi.schedule.profiling import TIMED_STEPS, WARMUP_STEPS

    images = SAMPLES["train"] + SAMPLES["val"]
    teacher, student = costs["teacher_forward_s"], costs["student_forward_s"]
    blocks = profile["blocks"]
    order = [name for name in costs["blocks"] if name in blocks]
    score = (CALIBRATION_SAMPLES + SAMPLES["val"]) * teacher  # one solo swap
    ratio = job.distill.chained_epochs / job.distill.epochs
    parallel = [blocks[name]["estimated_s"] * ratio for name in order[1:-1]]
    last = blocks[order[-1]]["estimated_s"] * ratio + images * student
    inputs = images * student
    chained = {"parallel_s": sum(parallel),
               "blocks": [{"seconds": s, "parallel": True} for s in parallel]}
    phases = {
        "blocks": 0.0,
        "cache": images * teacher,
        "profile": sum(b["setup_s"] + (WARMUP_STEPS + TIMED_STEPS) * b["seconds_per_step"]
                       for b in blocks.values()),
        "distill": makespan_1 + score * (len(order) + 1),
        "accept": 0.0,
        "chain": inputs + sum(parallel) + last,
        "assemble": 4000 * student,
        "finetune": job.finetune.epochs * (SAMPLES["train"] * costs["student_train_s"]
                                           + SAMPLES["val"] * student),
    }
    return phases, chained


def main() -> None:
    from pbkd_mpi.config import load_job
    from pbkd_mpi.mpi.devices import configure_tensorflow_choice, import_tensorflow
    from pbkd_mpi.schedule.estimates import load_profile
    from pbkd_mpi.schedule.projection import simulate_profile
    from pbkd_mpi.schedule.whole_run import project_run, render_projection

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,16,64")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    import_tensorflow()
    configure_tensorflow_choice(1, 0)  # one thread, as the saved profiles were timed
    summary = {}
    for model, (name, job_file) in MODELS.items():
        job = load_job(job_file)
        job = dataclasses.replace(job, distill=dataclasses.replace(
            job.distill, chained_epochs=4, chained_order="parallel"))
        profile = load_profile(PROFILES / f"{model}-profile.json")

        def makespan_for(count: int, profile=profile) -> float:
            rows = simulate_profile(profile, [count])[count]["policies"]
            return rows["work-stealing+split"]["makespan_s"]

        costs = measured_costs(name, job)
        phases, chained = modelled_phases(costs, profile, job, makespan_for(1))
        table = project_run(phases, 1, makespan_for, workers, chained)
        print(json.dumps({"model": model, "costs_per_image_s": {
            k: v for k, v in costs.items() if k != "blocks"}, "phases_1w_s": phases}),
              flush=True)
        print(render_projection(table, f"{model} at 32x32, modelled from costs measured "
                                       f"here (benchmarks/whole_run_projection.py)"),
              flush=True)
        summary[model] = {w: {"speedup": round(row["speedup"], 3),
                              "sequential_share": round(row["sequential_share"], 3),
                              "total_s": round(row["total_s"], 1)}
                          for w, row in table.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
