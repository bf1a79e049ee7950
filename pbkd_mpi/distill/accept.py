"""Per-block acceptance: each student block swapped alone into the teacher, scored on
validation.

A block whose student alone costs more than `accept.max_drop` of the teacher's validation
accuracy is retrained once with a wider student (depth multiplier times `accept.widen`);
if the wider one still costs too much, the block stays the teacher's. Only validation
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
    score_seconds: float = 0.0  # the workers' time scoring them (during distillation)


class Judge:
    """Acceptance as the students arrive; it scores nothing itself. `arrived` asks for a
    student's score, `scored` takes a score and may ask for a wider retrain, and
    `take_requests` hands over what was asked (the teacher's own score first), for the
    workers to run (score.py). `acceptance()` gives the verdicts once every score is in."""

    def __init__(self, blocks, depth_multiplier: int, config, source=None, log=print):
        self.config, self.source, self.log = config, source, log
        self.detail = getattr(log, "detail", log)
        self.blocks = {block.name: block for block in blocks}
        self.multipliers = (depth_multiplier, depth_multiplier * config.widen)
        self.scores: list[ScoreTask] = [ScoreTask(source)]  # asked for, not handed over
        self.retrains: list[str] = []
        self.unjudged: list[tuple[ScoreTask, float]] = []  # scored before the teacher
        self.verdicts: dict[str, Verdict] = {}
        self.kept: dict[str, dict] = {}  # block name -> the student weights it keeps
        self.teacher_val: float | None = None
        self.seconds = 0.0  # the workers' time scoring

    @property
    def wider_multiplier(self) -> int:
        return self.multipliers[1]

    def arrived(self, name: str, weights: dict, wider: bool = False) -> None:
        self.scores.append(ScoreTask(self.source, self.blocks[name], weights,
                                     self.multipliers[wider], wider))

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
        if not task.wider:
            self.verdicts[name] = Verdict(name, solo, drop, ACCEPTED if passed else KEPT_TEACHER,
                                          self.multipliers[0])
            if not passed:
                self.retrains.append(name)
                self.log(f"acceptance: block {name} alone costs {drop:.3f} of validation "
                         f"accuracy (more than {self.config.max_drop:.3f}); retraining it "
                         f"with depth multiplier {self.multipliers[1]} as the others train")
        else:
            first = self.verdicts[name]
            self.verdicts[name] = Verdict(name, first.solo_val_accuracy, first.drop,
                                          ACCEPTED_WIDER if passed else KEPT_TEACHER,
                                          self.multipliers[1], solo, drop)
        if passed:
            self.kept[name] = task.weights
        outcome = "a wider retrain" if name in self.retrains else self.verdicts[name].decision
        self.detail(f"block {name}{' (wider)' if task.wider else ''}: alone {solo:.4f} val "
                    f"accuracy (teacher {self.teacher_val:.4f}) -> {outcome}")

    def wider_failed(self, name: str) -> None:
        """The wider retrain failed on every attempt: the block stays the teacher's."""
        self.verdicts[name] = dataclasses.replace(self.verdicts[name], decision=KEPT_TEACHER,
                                                  depth_multiplier=self.multipliers[1])

    def acceptance(self) -> Acceptance:
        """The verdicts, in the blocks' order, once every score is in."""
        if self.busy() or self.unjudged or self.teacher_val is None:
            raise RuntimeError("acceptance is not complete: scores or retrains are missing")
        verdicts = {name: self.verdicts[name] for name in self.blocks if name in self.verdicts}
        kept = {name: self.kept[name] for name in verdicts if name in self.kept}
        return Acceptance(verdicts, kept,
                          {name: verdicts[name].depth_multiplier for name in kept},
                          self.teacher_val, self.seconds)


def stage_judge(blocks, job, teacher_file: str, teacher_fingerprint: str, dataset,
                log) -> Judge:
    """Rank 0's judge for a run: the job's settings; the workers score on the teacher
    file and the data rank 0 has, each checked by its fingerprint."""
    source = ScoreSource(str(teacher_file), teacher_fingerprint, job.data,
                         dataset.fingerprint(), job.run.seed)
    return Judge(blocks, job.student.depth_multiplier, job.accept, source, log)
