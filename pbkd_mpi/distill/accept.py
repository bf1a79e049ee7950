"""Per-block acceptance: each student block swapped alone into the teacher, scored on
validation.

A block whose student alone costs more than `accept.max_drop` of the teacher's validation
accuracy is retrained once with its retry student (model/choice.py: the next candidate of
the job's objective, or the wider student, depth multiplier times `accept.widen`); if the
retry still costs too much, the block stays the teacher's. Only validation
data is used, so the test split stays untouched for the final figures.

The verdicts are made while distillation runs (`Judge`): each student's score is a task
(score.py) that joins the running schedule the moment the student arrives, ahead of the
blocks still queued, and a failing block's wider retrain joins it as soon as the score is
in, instead of waiting for the last block (distill/tasks.py). Nothing about a verdict
depends on when or where it is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import NamedTuple

from pbkd_mpi.distill.score import ScoreSource, ScoreTask
from pbkd_mpi.model.choice import describe

ACCEPTED, ACCEPTED_WIDER, KEPT_TEACHER = "accepted", "accepted_wider", "kept_teacher"


@dataclass(frozen=True)
class Verdict:
    name: str
    solo_val_accuracy: float  # teacher with only this block's (first) student swapped in
    drop: float  # teacher's validation accuracy minus solo_val_accuracy
    decision: str  # accepted, accepted_wider (the retry kept) or kept_teacher
    depth_multiplier: int  # of the student kept (or of the last one tried)
    family: str = "separable"  # of the student kept (or of the last one tried)
    width: int = 0
    wider_solo_val_accuracy: float | None = None  # after the retrain, when there was one
    wider_drop: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Acceptance(NamedTuple):
    verdicts: dict  # block name -> Verdict
    kept: dict  # block name -> the student weights kept (blocks replaced)
    multipliers: dict  # block name -> depth multiplier of the student kept
    blocks: dict  # block name -> the block with the family and width of the student kept
    teacher_val: float  # the teacher's validation accuracy, scored as the solo swaps
    score_seconds: float = 0.0  # the workers' time scoring them (during distillation)


class Judge:
    """Acceptance as the students arrive; it scores nothing itself. `arrived` asks for a
    student's score, `scored` takes a score and may ask for a wider retrain, and
    `take_requests` hands over what was asked (the teacher's own score first), for the
    workers to run (score.py). `acceptance()` gives the verdicts once every score is in."""

    def __init__(self, choice, config, source=None, log=print):
        self.config, self.source, self.log = config, source, log
        self.detail = getattr(log, "detail", log)
        self.blocks = {block.name: block for block in choice.blocks}
        self.first = {block.name: choice.candidate(block) for block in choice.blocks}
        self.retries = dict(choice.retries)  # block name -> model/choice.Candidate
        self.scores: list[ScoreTask] = [ScoreTask(source)]  # asked for, not handed over
        self.retrains: list[str] = []
        self.unjudged: list[tuple[ScoreTask, float]] = []  # scored before the teacher
        self.verdicts: dict[str, Verdict] = {}
        self.kept: dict[str, dict] = {}  # block name -> the student weights it keeps
        self.teacher_val: float | None = None
        self.seconds = 0.0  # the workers' time scoring

    def student(self, name: str, retry: bool = False):
        """Block `name`'s first student, or its retry (a model/choice.Candidate)."""
        return self.retries[name] if retry else self.first[name]

    def arrived(self, name: str, weights: dict, wider: bool = False) -> None:
        student = self.student(name, wider)
        self.scores.append(ScoreTask(self.source, student.block, weights,
                                     student.depth_multiplier, wider))

    def busy(self) -> bool:
        """Whether something was asked for and not handed over yet."""
        return bool(self.scores or self.retrains)

    def take_requests(self) -> tuple[list[ScoreTask], list[str]]:
        """(the scores to run, the blocks to retrain wider) asked for since the last call."""
        requests = (self.scores, self.retrains)
        self.scores, self.retrains = [], []
        return requests

    def scored(self, task: ScoreTask, accuracy: float, seconds: float = 0.0) -> None:
        self.seconds += seconds
        if task.block is None:
            self.teacher_val = accuracy
            for waiting, solo in self.unjudged:
                self._judge(waiting, solo)
            self.unjudged = []
        elif self.teacher_val is None:
            self.unjudged.append((task, accuracy))
        else:
            self._judge(task, accuracy)

    def _judge(self, task: ScoreTask, solo: float) -> None:
        name = task.block.name
        drop = self.teacher_val - solo
        passed = drop <= self.config.max_drop
        student = self.student(name, task.wider)
        tried = dict(depth_multiplier=student.depth_multiplier, family=student.block.family,
                     width=student.block.width)
        if not task.wider:
            self.verdicts[name] = Verdict(name, solo, drop, ACCEPTED if passed else KEPT_TEACHER,
                                          **tried)
            if not passed:
                self.retrains.append(name)
                self.log(f"acceptance: block {name} alone costs {drop:.3f} of validation "
                         f"accuracy (more than {self.config.max_drop:.3f}); retraining it "
                         f"as {describe(self.retries[name])} as the others train")
        else:
            first = self.verdicts[name]
            self.verdicts[name] = Verdict(name, first.solo_val_accuracy, first.drop,
                                          ACCEPTED_WIDER if passed else KEPT_TEACHER,
                                          wider_solo_val_accuracy=solo, wider_drop=drop,
                                          **tried)
        if passed:
            self.kept[name] = task.weights
        outcome = "a retrain" if name in self.retrains else self.verdicts[name].decision
        self.detail(f"block {name}{' (retry)' if task.wider else ''}: alone {solo:.4f} val "
                    f"accuracy (teacher {self.teacher_val:.4f}) -> {outcome}")

    def wider_failed(self, name: str) -> None:
        """The retry failed on every attempt: the block stays the teacher's."""
        retry = self.retries[name]
        self.verdicts[name] = dataclasses.replace(
            self.verdicts[name], decision=KEPT_TEACHER, depth_multiplier=retry.depth_multiplier,
            family=retry.block.family, width=retry.block.width)

    def acceptance(self) -> Acceptance:
        """The verdicts, in the blocks' order, once every score is in."""
        if self.busy() or self.unjudged or self.teacher_val is None:
            raise RuntimeError("acceptance is not complete: scores or retrains are missing")
        verdicts = {name: self.verdicts[name] for name in self.blocks if name in self.verdicts}
        kept = {name: self.kept[name] for name in verdicts if name in self.kept}
        blocks = {name: self.student(name, verdicts[name].decision == ACCEPTED_WIDER).block
                  for name in kept}
        return Acceptance(verdicts, kept,
                          {name: verdicts[name].depth_multiplier for name in kept},
                          blocks, self.teacher_val, self.seconds)


def stage_judge(choice, job, teacher_file: str, teacher_fingerprint: str, dataset,
                log) -> Judge:
    """Rank 0's judge for a run: the students of `choice` (model/choice.StudentChoice), the
    job's settings; the workers score on the teacher file and the data rank 0 has, each
    checked by its fingerprint."""
    source = ScoreSource(str(teacher_file), teacher_fingerprint, job.data,
                         dataset.fingerprint(), job.run.seed)
    return Judge(choice, job.accept, source, log)


def kept_blocks(blocks, acceptance: Acceptance) -> list:
    """`blocks` with the family and width of the student each kept."""
    return [acceptance.blocks.get(block.name, block) for block in blocks]
