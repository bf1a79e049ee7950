"""Per-block acceptance: each student block swapped alone into the teacher, scored on
validation.

A block whose student alone costs more than `accept.max_drop` of the teacher's validation
accuracy is retrained once with a wider student (depth multiplier times `accept.widen`);
if the wider one still costs too much, the block stays the teacher's. Only validation
data is used, so the test split stays untouched for the final figures.
"""

from __future__ import annotations

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


def first_verdicts(teacher, blocks, weights: dict, depth_multiplier: int, x_val, y_val,
                   max_drop: float, teacher_val: float, x_calibrate=None
                   ) -> dict[str, Verdict]:
    """Verdicts of the first students: accepted, or (decision KEPT_TEACHER for now)
    candidates for a wider retrain. `weights`: {block name: student weights}."""
    verdicts = {}
    for block in blocks:
        if block.name not in weights:
            continue  # failed on every attempt: it stays the teacher's anyway
        solo = solo_accuracy(teacher, block, weights[block.name], depth_multiplier, x_val,
                             y_val, x_calibrate)
        drop = teacher_val - solo
        verdicts[block.name] = Verdict(block.name, solo, drop,
                                       ACCEPTED if drop <= max_drop else KEPT_TEACHER,
                                       depth_multiplier)
    return verdicts


def wider_verdict(first: Verdict, teacher, block, weights: dict | None, depth_multiplier: int,
                  x_val, y_val, max_drop: float, teacher_val: float, x_calibrate=None
                  ) -> Verdict:
    """The verdict after the retrain (`weights` None: the retrain failed)."""
    if weights is None:
        return Verdict(first.name, first.solo_val_accuracy, first.drop, KEPT_TEACHER,
                       depth_multiplier)
    solo = solo_accuracy(teacher, block, weights, depth_multiplier, x_val, y_val, x_calibrate)
    drop = teacher_val - solo
    return Verdict(first.name, first.solo_val_accuracy, first.drop,
                   ACCEPTED_WIDER if drop <= max_drop else KEPT_TEACHER, depth_multiplier,
                   solo, drop)


def accept_blocks(teacher, blocks, trained: dict, depth_multiplier: int, config, x_val, y_val,
                  retrain, log=print, x_calibrate=None) -> Acceptance:
    """Score every trained block alone, retrain the failing ones wider once, decide.

    `trained`: {block name: first student weights}; `retrain(names, multiplier)` trains
    those blocks' wider students (on the workers) and returns {name: weights} for those
    that finished."""
    teacher_val = teacher_accuracy(teacher, x_val, y_val, x_calibrate)
    verdicts = first_verdicts(teacher, blocks, trained, depth_multiplier, x_val, y_val,
                              config.max_drop, teacher_val, x_calibrate)
    failing = [name for name, v in verdicts.items() if v.decision != ACCEPTED]
    wide_weights = {}
    if failing:
        wider = depth_multiplier * config.widen
        log(f"acceptance: {len(failing)} block(s) cost more than {config.max_drop:.3f} of "
            f"validation accuracy alone ({', '.join(failing)}); retraining with depth "
            f"multiplier {wider}")
        wide_weights = retrain(failing, wider)
        by_name = {block.name: block for block in blocks}
        for name in failing:
            verdicts[name] = wider_verdict(verdicts[name], teacher, by_name[name],
                                           wide_weights.get(name), wider, x_val, y_val,
                                           config.max_drop, teacher_val, x_calibrate)
    kept = {name: (wide_weights[name] if v.decision == ACCEPTED_WIDER else trained[name])
            for name, v in verdicts.items() if v.decision != KEPT_TEACHER}
    multipliers = {name: verdicts[name].depth_multiplier for name in kept}
    return Acceptance(verdicts, kept, multipliers, teacher_val)


def accept_stage(teacher, blocks, tasks, job, dataset, log) -> Acceptance:
    """Rank 0's acceptance stage: `accept_blocks` on the first students of `tasks`
    (distill/tasks.BlockTasks), which also trains the wider ones."""
    acceptance = accept_blocks(teacher, blocks, tasks.first_weights(),
                               job.student.depth_multiplier, job.accept, dataset.x_val,
                               dataset.y_val, tasks.retrain_wider, log, dataset.x_train)
    for verdict in acceptance.verdicts.values():
        log.detail(f"block {verdict.name}: alone {verdict.solo_val_accuracy:.4f} val accuracy "
                   f"(teacher {acceptance.teacher_val:.4f}) -> {verdict.decision}")
    return acceptance
