"""Per-block acceptance: each student block swapped alone into the teacher, scored on
validation.

A block whose student alone costs more than `accept.max_drop` of the teacher's validation
accuracy is retrained once with a wider student (depth multiplier times `accept.widen`);
if the wider one still costs too much, the block stays the teacher's. Only validation
data is used, so the test split stays untouched for the final figures.

The verdicts are made while distillation runs (`Judge`): rank 0 scores each student the
moment it arrives, between messages, while the workers train the other blocks, and a
failing block's wider retrain joins the same schedule at once instead of waiting for the
last block (distill/tasks.py). Nothing about a verdict depends on when it is made.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

from pbkd_mpi.model.assemble import assemble_student
from pbkd_mpi.model.evaluate import recalibrated_accuracy

ACCEPTED, ACCEPTED_WIDER, KEPT_TEACHER = "accepted", "accepted_wider", "kept_teacher"


@dataclass(frozen=True)
class Verdict:
    name: str
    solo_val_accuracy: float  # teacher with only this block's (first) student swapped in
    drop: float  # teacher's validation accuracy minus solo_val_accuracy
    decision: str  # accepted, accepted_wider or kept_teacher
    depth_multiplier: int  # of the student kept (or of the last one tried)
    wider_solo_val_accuracy: float | None = None  # after the retrain, when there was one
    wider_drop: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Acceptance(NamedTuple):
    verdicts: dict  # block name -> Verdict
    kept: dict  # block name -> the student weights kept (blocks replaced)
    multipliers: dict  # block name -> depth multiplier of the student kept
    teacher_val: float  # the teacher's validation accuracy, scored as the solo swaps
    score_seconds: float = 0.0  # rank 0's time scoring them (during distillation)


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
    return recalibrated_accuracy(model, x, y, x_calibrate, samples=CALIBRATION_SAMPLES)


class Judge:
    """Acceptance as the students arrive. `arrived` queues a student to score; `step`
    scores one and returns the names of blocks to retrain wider (at most one);
    `acceptance()` gives the verdicts once every student is in."""

    def __init__(self, teacher, blocks, depth_multiplier: int, config, x_val, y_val,
                 x_calibrate=None, log=print):
        self.teacher, self.config, self.log = teacher, config, log
        self.detail = getattr(log, "detail", log)
        self.data = (x_val, y_val, x_calibrate)
        self.blocks = {block.name: block for block in blocks}
        self.multipliers = (depth_multiplier, depth_multiplier * config.widen)
        self.waiting: list[tuple[str, dict, bool]] = []
        self.verdicts: dict[str, Verdict] = {}
        self.kept: dict[str, dict] = {}  # block name -> the student weights it keeps
        self.teacher_val: float | None = None
        self.seconds = 0.0  # spent scoring

    @property
    def wider_multiplier(self) -> int:
        return self.multipliers[1]

    def arrived(self, name: str, weights: dict, wider: bool = False) -> None:
        self.waiting.append((name, weights, wider))

    def busy(self) -> bool:
        return bool(self.waiting)

    def step(self) -> list[str]:
        started = time.perf_counter()
        self._score_teacher()
        name, weights, wider = self.waiting.pop(0)
        solo = solo_accuracy(self.teacher, self.blocks[name], weights,
                             self.multipliers[wider], *self.data)
        drop = self.teacher_val - solo
        passed = drop <= self.config.max_drop
        retrain = []
        if not wider:
            self.verdicts[name] = Verdict(name, solo, drop, ACCEPTED if passed else KEPT_TEACHER,
                                          self.multipliers[0])
            if not passed:
                retrain = [name]
                self.log(f"acceptance: block {name} alone costs {drop:.3f} of validation "
                         f"accuracy (more than {self.config.max_drop:.3f}); retraining it "
                         f"with depth multiplier {self.multipliers[1]} as the others train")
        else:
            first = self.verdicts[name]
            self.verdicts[name] = Verdict(name, first.solo_val_accuracy, first.drop,
                                          ACCEPTED_WIDER if passed else KEPT_TEACHER,
                                          self.multipliers[1], solo, drop)
        if passed:
            self.kept[name] = weights
        self.detail(f"block {name}{' (wider)' if wider else ''}: alone {solo:.4f} val "
                    f"accuracy (teacher {self.teacher_val:.4f}) -> "
                    f"{'a wider retrain' if retrain else self.verdicts[name].decision}")
        self.seconds += time.perf_counter() - started
        return retrain

    def wider_failed(self, name: str) -> None:
        """The wider retrain failed on every attempt: the block stays the teacher's."""
        self.verdicts[name] = dataclasses.replace(self.verdicts[name], decision=KEPT_TEACHER,
                                                  depth_multiplier=self.multipliers[1])

    def acceptance(self) -> Acceptance:
        """The verdicts, in the blocks' order (every student scored: `busy()` is False)."""
        if self.waiting:
            raise RuntimeError(f"{len(self.waiting)} student(s) not scored yet")
        self._score_teacher()
        verdicts = {name: self.verdicts[name] for name in self.blocks if name in self.verdicts}
        kept = {name: self.kept[name] for name in verdicts if name in self.kept}
        return Acceptance(verdicts, kept,
                          {name: verdicts[name].depth_multiplier for name in kept},
                          self.teacher_val, self.seconds)

    def _score_teacher(self) -> None:
        if self.teacher_val is None:
            self.teacher_val = teacher_accuracy(self.teacher, *self.data)


def stage_judge(teacher, blocks, job, dataset, log) -> Judge:
    """Rank 0's judge for a run: the job's settings, validation images to score on,
    training images to re-estimate BN statistics on."""
    return Judge(teacher, blocks, job.student.depth_multiplier, job.accept, dataset.x_val,
                 dataset.y_val, dataset.x_train, log)
