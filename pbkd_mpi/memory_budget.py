"""Each rank's memory budget, and the refusal, in seconds, of a job that cannot fit in it.

The budget is `run.memory_budget_mb`, or, at 0, the node's memory shared among the ranks
on it. The node's memory is the smallest of what the machine has, the cgroup's limit (a
container, a Slurm job with ConstrainRAMSpace) and Slurm's `--mem`. Before anything large
is read, rank 0 adds up what one rank holds at once in the worst phase, and refuses the
job when that exceeds the budget, naming each part and what to change: a job left to
swap runs for hours and then dies to the out-of-memory killer.

What a rank holds at once (every rank loads the same things, so one estimate covers all):
- the runtime: Python, TensorFlow and Keras, measured at about 620 MB resident after
  import on Linux x86-64 (TF 2.20, Keras 3);
- the data set's images where its loader keeps them in RAM (.npz and the demo; image
  folders and HDF5 files are streamed and count nothing);
- the teacher's logits for distillation fine-tuning in recompute mode (float32, train
  and validation; from the cache they are read a batch at a time);
- one block task's pairs, when they fit `cache.memory_budget_mb` (else they are streamed);
- the activations of one fine-tuning batch: backpropagation keeps every layer's output
  (float32) of the batch, `finetune.batch_size` times the teacher's outputs per sample.
  At 224 px this is the largest part (a ResNet50 cut after conv2_block2: 54 MB a sample,
  3.5 GB a batch of 64; measured peak 4.2 GB on that rank).
It is an estimate from below: models, optimizer state, tf.data's buffers and TensorFlow's
own arenas come on top (on the demo under `mpiexec -n 3`, estimate 1.04 GB, measured
peaks 1.70 GB on rank 0 and 2.09 and 2.18 GB on the workers). A job refused by it cannot
fit; a job it passes is watched while it runs (output/memory.MemoryWatch) and its peaks
are in the report.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import psutil

from pbkd_mpi.cache.layout import pair_bytes, part_counts
from pbkd_mpi.errors import UserError
from pbkd_mpi.model.cost import activation_bytes
from pbkd_mpi.output.logs import LOGGER
from pbkd_mpi.output.memory import MemoryWatch

RUNTIME_BYTES = 620 << 20
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max",  # cgroup v2
                  "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v1


def node_memory_bytes(environ: Mapping[str, str] = os.environ,
                      cgroup_files=_CGROUP_LIMITS) -> tuple[int, str]:
    """(bytes, where the figure comes from): the least of the machine's memory, the
    cgroup's limit and Slurm's per-node memory."""
    found = [(psutil.virtual_memory().total, "the machine's memory")]
    for name in cgroup_files:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit
            found.append((int(text), f"the cgroup limit ({name})"))
    if environ.get("SLURM_MEM_PER_NODE", "").isdigit():
        found.append((int(environ["SLURM_MEM_PER_NODE"]) << 20, "Slurm's --mem"))
    return min(found)


@dataclass(frozen=True)
class MemoryBudget:
    budget_bytes: int
    source: str          # how the budget was chosen
    needs: dict          # {part: bytes} one rank holds at once

    @property
    def need_bytes(self) -> int:
        return sum(self.needs.values())

    def as_dict(self) -> dict:
        return {"budget_mb": round(self.budget_bytes / 2**20),
                "source": self.source,
                "estimate_mb": round(self.need_bytes / 2**20),
                "needs_mb": {k: round(v / 2**20) for k, v in self.needs.items()}}


def rank_budget(requested_mb: int, ranks_on_node: int,
                environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """(bytes, explanation) of one rank's budget."""
    if requested_mb:
        return requested_mb << 20, "run.memory_budget_mb"
    node, where = node_memory_bytes(environ)
    ranks = max(1, ranks_on_node)
    return node // ranks, f"{where}, {node / 2**30:.1f} GiB, shared by {ranks} rank(s) on the node"


def in_memory_image_bytes(dataset) -> int:
    """Bytes of the data set's images its loader holds in RAM (each source once)."""
    sources = {}
    for name in ("x_train", "x_val", "x_test"):
        source = dataset.uncounted(name).source
        array = getattr(source, "array", None)
        if isinstance(array, np.ndarray):
            sources[id(array)] = array.nbytes
    return sum(sources.values())


def estimate(job, dataset, blocks, ranks_on_node: int,
             environ: Mapping[str, str] = os.environ, teacher=None) -> MemoryBudget:
    """What one rank holds at once, and its budget (see the module's doc). `blocks` and
    `teacher` None: before the teacher is loaded, everything but the block pairs and the
    batch's activations (a first, early check)."""
    budget, source = rank_budget(job.run.memory_budget_mb, ranks_on_node, environ)
    needs = {"runtime": RUNTIME_BYTES, "images": in_memory_image_bytes(dataset)}
    if job.finetune.loss == "distill" and job.finetune.epochs and job.cache.mode == "recompute":
        # From the cache they are read a batch at a time; recomputed, they are held.
        needs["teacher_logits"] = (len(dataset.y_train) + len(dataset.y_val)) \
            * dataset.num_classes * 4
    if job.cache.mode != "recompute" and blocks is not None:
        # A task loads every part it reads (the plain training set, its views, validation).
        samples = sum(part_counts(dataset, job.cache.views).values())
        item_bytes = np.dtype(job.cache.dtype).itemsize
        largest = max((pair_bytes(block, item_bytes) for block in blocks), default=0)
        needs["block_pairs"] = min(samples * largest, job.cache.memory_budget_mb << 20)
    if teacher is not None and job.finetune.epochs:
        needs["activations"] = job.finetune.batch_size * activation_bytes(teacher)
    return MemoryBudget(budget, source, needs)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.0f} MB" if size >= 2**20 else "<1 MB"


def require_fits(plan: MemoryBudget, ranks_on_node: int) -> None:
    """Refuse a job whose estimate exceeds the budget, with what to change."""
    if plan.need_bytes <= plan.budget_bytes:
        return
    parts = ", ".join(f"{name} {_megabytes(size)}" for name, size in plan.needs.items()
                      if size)
    options = [f"run fewer ranks on each node (now {ranks_on_node})",
               "give more memory per rank (run.memory_budget_mb, Slurm's --mem)"]
    if plan.needs.get("block_pairs"):
        options.append("lower cache.memory_budget_mb: block pairs past it are streamed "
                       "from the cache file")
    if plan.needs.get("activations"):
        options.append("lower finetune.batch_size: one batch's activations are "
                       f"{_megabytes(plan.needs['activations'])}")
    if plan.needs.get("images"):
        options.append("give the data as an image folder or an HDF5 file, which are "
                       "streamed, instead of images held in RAM (.npz, the demo)")
    raise UserError(
        f"Each rank needs about {plan.need_bytes / 2**20:,.0f} MB ({parts}) but its memory "
        f"budget is {plan.budget_bytes / 2**20:,.0f} MB ({plan.source}). Options: "
        + "; ".join(options) + ".")


def watch(job, ranks_on_node: int, rank: int):
    """A MemoryWatch of this rank against its budget; its warnings go to stderr (one line,
    the launcher's console) and to the rank's log."""
    def warn(message: str) -> None:
        LOGGER.warning(message)
        print(f"warning: rank {rank}: {message}", file=sys.stderr, flush=True)

    return MemoryWatch(rank_budget(job.run.memory_budget_mb, ranks_on_node)[0], warn)
