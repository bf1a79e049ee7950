"""Fine-tuning epoch time with 2 ranks vs 1 rank on this machine (data_parallel.py).

The model is the demo job's student (the demo teacher's architecture with every block
replaced by its student, started from the factorised teacher kernels), fine-tuned on the
demo data with the distillation loss against fixed teacher logits, exactly as
finetune.finetune does it, global batch `finetune.batch_size`. Both runs use every core:
1 rank with `cores` intra-op threads, 2 ranks with cores / 2 each. The first epoch (graph
tracing) is not timed; the figure is the median of the timed epochs' wall time on rank 0.
Prints one JSON object, last line.

    python benchmarks/finetune_speedup.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(out: str, epochs: int) -> None:
    """One rank of a measured run (under mpiexec)."""
    from mpi4py import MPI

    from pbkd_mpi.mpi.devices import configure_tensorflow, node_cores

    comm = MPI.COMM_WORLD
    threads = max(1, node_cores() // comm.Get_size())
    configure_tensorflow(threads, comm.Get_rank(), 1, use_gpu=False)
    import dataclasses

    import keras
    import numpy as np

    from pbkd_mpi.model.assemble import assemble_student
    from pbkd_mpi.config import Job
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.finetune.train import FinetuneData, finetune
    from pbkd_mpi.model.graph import flatten_model
    from pbkd_mpi.model.selection import granularity_of, select_blocks
    from pbkd_mpi.model.students import initial_weights
    from pbkd_mpi.model.teacher import build_vgg_demo

    job = Job()
    data = load_dataset(job.data, job.run.seed)
    keras.utils.set_random_seed(0)
    teacher = flatten_model(build_vgg_demo(data.image_shape, data.num_classes,
                                           job.teacher.widths))
    multiplier = job.student.depth_multiplier
    blocks = select_blocks(teacher, granularity_of(job.blocks), multiplier, job.student.family,
                           job.student.width_multiplier, job.student.family_overrides)
    student = assemble_student(teacher, blocks, {b.name: initial_weights(b, teacher, multiplier)
                                                 for b in blocks}, multiplier)
    rng = np.random.default_rng(0)  # fixed soft targets: the loss's cost, not its values
    logits = (rng.normal(size=(len(data.y_train), data.num_classes)).astype(np.float32),
              rng.normal(size=(len(data.y_val), data.num_classes)).astype(np.float32))
    # No early stop and no collapse guard: every epoch runs and is timed.
    config = dataclasses.replace(job.finetune, epochs=epochs, patience=epochs + 1,
                                 collapse_drop=1.0)
    summary = finetune(student, FinetuneData.of(data, logits), config, comm, job.run.seed)
    if comm.Get_rank() == 0:
        Path(out).write_text(json.dumps({
            "epoch_seconds": summary["epoch_seconds"], "threads_per_rank": threads,
            "train_samples": len(data.y_train), "batch_size": config.batch_size,
            "student_params": int(student.count_params())}))


def run(ranks: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, __file__, "--measure",
                        str(out), "--epochs", str(epochs)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (>= 2)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.epochs)
        return
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first is not timed), got {args.epochs}")
    one, two = run(1, args.epochs), run(2, args.epochs)
    t1 = statistics.median(one["epoch_seconds"][1:])
    t2 = statistics.median(two["epoch_seconds"][1:])
    print(json.dumps({
        "speedup": t1 / t2,
        "epoch_s_1_rank": t1,
        "epoch_s_2_ranks": t2,
        "threads_per_rank": {"1": one["threads_per_rank"], "2": two["threads_per_rank"]},
        "timed_epochs": args.epochs - 1,
        "train_samples": one["train_samples"],
        "global_batch": one["batch_size"],
        "student_params": one["student_params"],
        "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
