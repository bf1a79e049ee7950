"""Acceptance's measurement as a task: one solo swap scored on a worker.

Scoring every student on rank 0 made rank 0 the bottleneck at scale: each score is a BN
re-estimation on training images and a validation pass of the whole network (VGG16 at
32 px: about 68 s on one core), one per block, so with 16 workers distillation waited on
rank 0's scores (benchmarks/whole_run_projection.py). As tasks, the scores spread over the
workers like the blocks do, and rank 0 only decides (accept.Judge).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pbkd_mpi.cache.reader import load_teacher_and_data
from pbkd_mpi.config import DataConfig
from pbkd_mpi.model.assemble import assemble_student
from pbkd_mpi.model.evaluate import recalibrated_accuracy
from pbkd_mpi.model.graph import Block, refresh_state


CALIBRATION_SAMPLES = 2000  # training images re-estimating BN statistics of a solo swap


def solo_accuracy(teacher, block, weights: dict, depth_multiplier: int, x, y,
                  x_calibrate=None) -> float:
    """Validation accuracy of the teacher with only `block` replaced by its student, its
    BN statistics re-estimated on training images first as the assembled student's are."""
    model = assemble_student(teacher, [block], {block.name: weights}, depth_multiplier)
    return recalibrated_accuracy(model, x, y, x_calibrate, samples=CALIBRATION_SAMPLES)


def teacher_accuracy(teacher, x, y, x_calibrate=None) -> float:
    """What a solo score is compared with: the teacher's validation accuracy with its BN
    statistics re-estimated on the same training images as a solo swap's (no block
    replaced), so that a drop is the block's alone, not the re-estimation's."""
    import keras


    model = teacher
    if x_calibrate is not None:  # a copy: the teacher itself keeps its statistics
        model = keras.models.clone_model(teacher)
        model.set_weights(teacher.get_weights())
        refresh_state(model)
    return recalibrated_accuracy(model, x, y, x_calibrate, samples=CALIBRATION_SAMPLES)


@dataclass(frozen=True)
class ScoreSource:
    """What a worker loads to score: rank 0's teacher file and data, each checked against
    rank 0's fingerprint (cache/reader.load_teacher_and_data)."""

    teacher_file: str
    teacher_fingerprint: str
    data: DataConfig
    data_fingerprint: str
    seed: int


@dataclass(frozen=True)
class ScoreTask:
    """The teacher with `block` replaced by a student (`weights`, `depth_multiplier`),
    scored on validation; `block` None: the teacher alone, what each swap is compared
    with. `wider`: the student is acceptance's wider retrain."""

    source: ScoreSource
    block: Block | None = None
    weights: dict | None = None
    depth_multiplier: int = 1
    wider: bool = False

    @property
    def name(self) -> str:
        return self.block.name if self.block is not None else "teacher"


def run_score(task: ScoreTask) -> dict:
    """{"val_accuracy", "seconds"} of the solo swap (or of the teacher), on a worker."""
    source = task.source
    teacher, dataset = load_teacher_and_data(source.teacher_file, source.teacher_fingerprint,
                                             source.data, source.data_fingerprint, source.seed)
    return score_with(teacher, dataset, task)


def score_with(teacher, dataset, task: ScoreTask) -> dict:
    """`run_score` with the teacher and data at hand."""
    started = time.perf_counter()
    if task.block is None:
        accuracy = teacher_accuracy(teacher, dataset.x_val, dataset.y_val, dataset.x_train)
    else:
        accuracy = solo_accuracy(teacher, task.block, task.weights, task.depth_multiplier,
                                 dataset.x_val, dataset.y_val, dataset.x_train)
    return {"val_accuracy": accuracy, "seconds": time.perf_counter() - started}
