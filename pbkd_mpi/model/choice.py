"""Which student each block gets: `student.objective` over the block's candidates.

The job's family and depth multiplier give each block its published student (the `params`
objective's choice) and with it the block's parameter budget. The candidates are students
of about that size in other forms: the published one and the dense low-rank student of
the largest rank within the budget; under `latency`, the teacher's own block too, which
needs no training and loses no accuracy. (Smaller students are not candidates: the
separable student at depth multiplier 1 runs 2x faster but, measured on the demo, cost 4
of 6 blocks more than 3 points of accuracy alone and the deep job 5 points after
fine-tuning.) `latency` times each alone (in a run on the workers,
model/choice_timing.py), its BNs folded as in the saved student, on the runtimes of the
job's target at each of its batches (block_timing.py), gives each the geometric mean of
its time relative to the fastest, and takes the most accurate candidate (the teacher's
block, then the published student, then the low-rank one) within `student.min_speedup` of
the fastest: at equal parameters the low-rank students of the deep job ran 3-15% faster
and learned their blocks to 2-2.7x the relative error, and a student no faster than its
teacher block costs accuracy for nothing (a first conv on three input channels: 18 us in
TFLite against 19 for its low-rank and 28 for its separable student; a 16-channel conv at
32x32, whose separable student is faster in TFLite and slower in Keras). `flops` ranks by
FLOPs. The first is trained, unless it is the teacher's block: that block is kept and is
not a task. Acceptance's retry is the published student when another went first, else the
wider published student (as under `params`).

Blocks whose candidates are equal (timing_groups: a stage's repeated blocks) are timed
once and share the figures, and a block is timed only as long as its choice is in doubt
(time_candidates).

The choice is made once per run directory and kept in RUN/students.json: timings vary
from run to run, and a resumed run must train the students its finished results belong to.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np

from pbkd_mpi import atomic
from pbkd_mpi.keys import json_key
from pbkd_mpi.model.assemble import copy_block
from pbkd_mpi.model.block_timing import (InterleavedTimer, check_target, model_runners,
                                         runtime_label, runtimes)
from pbkd_mpi.model.fold import fold_batchnorm
from pbkd_mpi.model.graph import Block, block_structures, flatten_model
from pbkd_mpi.model.students import build_student_model, family_for, sized, student_cost
from pbkd_mpi.mpi.devices import intra_op_threads

CHOICE_FILE = "students.json"
# One timed call of a block stays under this many FLOPs (the batch is cut to fit): at
# batch 32 a 224 px block takes seconds a call, and a few images already time its
# throughput.
MAX_TIMED_FLOPS = 2e9
TEACHER = "teacher"  # the candidate family that keeps the teacher's own block
# In the key of RUN/students.json: a record made with other candidates is measured again.
CANDIDATES_VERSION = 2
# A block's candidates are timed this many rounds at a time at each measure (runtime and
# batch), until the medians leave the choice in no doubt (settled: the candidates that
# decide it SETTLED_MARGIN times off the min_speedup line) or each measure has had
# block_timing's full budget (what every block had before). NASNetMobile at 96 px, `layer`,
# idle 2 cores, two runs each way: every one of its 35 blocks timed got the choice the full
# budget gave it, in 26-35 s of timing instead of 69-77 s.
QUICK_ROUNDS = 10
SETTLED_MARGIN = 1.15


@dataclass(frozen=True)
class Candidate:
    """One student of a block: its family and width (in `block`) and depth multiplier;
    family TEACHER: the teacher's own block, kept."""

    block: Block
    depth_multiplier: int

    @property
    def keeps_teacher(self) -> bool:
        return self.block.family == TEACHER

    @property
    def cost(self) -> tuple[int, int]:
        if self.keeps_teacher:
            return self.block.teacher_params, self.block.teacher_flops
        return student_cost(self.block, self.depth_multiplier)

    def model(self, teacher):
        """The candidate as a standalone model of the block's input (for timing)."""
        if not self.keeps_teacher:
            return build_student_model(self.block, self.depth_multiplier)
        inputs = keras.Input(self.block.input_shape, name=f"{self.block.name}_input")
        return keras.Model(inputs, copy_block(teacher, self.block, inputs),
                           name=f"{self.block.name}_teacher")

    def to_dict(self) -> dict:
        params, flops = self.cost
        return {"family": self.block.family, "width": self.block.width,
                "depth_multiplier": self.depth_multiplier, "params": params, "flops": flops}

    @classmethod
    def from_dict(cls, block: Block, row: dict) -> Candidate:
        return cls(replace(block, family=row["family"], width=row["width"]),
                   row["depth_multiplier"])


@dataclass(frozen=True)
class StudentChoice:
    """The students a run trains, and acceptance's retry of each."""

    blocks: tuple  # the blocks to train, each with the family and width of its first student
    multipliers: dict  # block name -> the first student's depth multiplier
    retries: dict  # block name -> Candidate: acceptance's second try
    record: dict  # report.json's `students`, the blocks that keep the teacher's layers too

    def candidate(self, block: Block) -> Candidate:
        return Candidate(block, self.multipliers[block.name])

    @classmethod
    def published(cls, blocks, depth_multiplier: int, widen: int) -> StudentChoice:
        """The `params` objective's choice: every block's own student, retried wider."""
        return cls(tuple(blocks), {b.name: depth_multiplier for b in blocks},
                   {b.name: Candidate(b, depth_multiplier * widen) for b in blocks},
                   {"objective": "params", "blocks": []})


def candidates(block: Block, depth_multiplier: int, pinned: bool = False,
               keep: bool = False) -> list[Candidate]:
    """The students of `block` about its published student's size and within it, that one
    first, preceded by the teacher's block when `keep`; `pinned` (a family the user named
    for this block): the published student alone."""
    published = Candidate(block, depth_multiplier)
    if pinned:
        return [published]
    found = [Candidate(replace(block, family=TEACHER), 1)] if keep else []
    found.append(published)
    if block.family != "low_rank" and (
            low_rank := _low_rank_within(block, published.cost[0])):
        found.append(low_rank)
    return found


def _low_rank_within(block: Block, budget: int) -> Candidate | None:
    """The widest low-rank student of `block` with at most `budget` parameters."""
    widest = Candidate(sized(replace(block, family="low_rank"),
                             budget / block.teacher_params, at_most=True), 1)
    return widest if widest.cost[0] <= budget else None


def choose_students(teacher, blocks, job, teacher_fingerprint: str, run_dir,
                    log, time_blocks=None, progress=None) -> StudentChoice:
    """The job's choice for `blocks` (model/selection.job_blocks) of `teacher` (flattened),
    made once per run directory: a RUN/students.json of the same blocks, settings and
    teacher is reused. `time_blocks(pairs, student)`, for the latency objective: the
    timings of each (block, its candidates) of `pairs` as `time_candidates` gives them,
    by block name, and a description of where they ran; by default timed here, one block
    after another (the run times them on the workers: model/choice_timing.py), calling
    `progress` (when given) before each and once at the end (_time_here). Blocks whose
    candidates are equal (timing_groups) are timed once."""
    student = job.student
    key = json_key({"teacher": teacher_fingerprint, "blocks": [b.to_dict() for b in blocks],
                    "student": {k: getattr(student, k) for k in (
                        "objective", "target", "latency_batches", "min_speedup",
                        "keep_teacher", "depth_multiplier", "family_overrides")},
                    "widen": job.accept.widen, "candidates": CANDIDATES_VERSION})
    path = Path(run_dir) / CHOICE_FILE if run_dir is not None else None
    saved = _load(path, key)
    if saved is not None:
        log(f"students: the choice of an earlier run ({path}), {student.objective} "
            f"objective")
        return from_record(blocks, saved, job.accept.widen)
    started = time.perf_counter()
    latency = student.objective == "latency"
    pinned = _pinned(blocks, student)
    found = {block.name: candidates(block, student.depth_multiplier,
                                    block.name in pinned or student.objective == "params",
                                    keep=latency and student.keep_teacher) for block in blocks}
    pairs = [(block, found[block.name]) for block in blocks
             if latency and len(found[block.name]) > 1]
    timings, timed_on, same_as = {}, None, {}
    if pairs:
        teacher = flatten_model(teacher)  # once: each teacher's block is cut from it
        same_as = timing_groups(teacher, pairs, student.latency_batches)
        distinct = [(block, found) for block, found in pairs if same_as[block.name] == block.name]
        timed, timed_on = (time_blocks or _time_here(teacher, progress, len(pairs) - len(
            distinct)))(distinct, student)
        # Blocks of equal candidates share the figures of the first (its name in the row).
        timings = {name: timed[first] for name, first in same_as.items()}
    rows = [_ranked(block, found[block.name], timings.get(block.name), job) for block in blocks]
    for row in rows:
        if same_as.get(row["name"], row["name"]) != row["name"]:
            row["timing_of"] = same_as[row["name"]]
    record = {"objective": student.objective, "key": key,
              "target": student.target if latency else None,
              "runtime": runtime_label(student.target) if latency else None,
              "timed_on": timed_on,
              "batches": list(student.latency_batches) if latency else None,
              "min_speedup": student.min_speedup if latency else None,
              "timed_blocks": len(set(same_as.values())) if latency else None,
              "seconds": time.perf_counter() - started,
              "blocks": rows}
    choice = from_record(blocks, record, job.accept.widen)
    if path is not None:
        atomic.write_text(path, json.dumps(record, indent=1))
    log(f"students ({student.objective}"
        + (f", {record['runtime']}, batches {record['batches']}, "
           f"{timing_summary(record)}" if record["timed_on"] else "")
        + "): "
        + ", ".join(f"{row['name']} {describe_row(row['candidates'][0])}" for row in rows))
    return choice


def _pinned(blocks, student) -> set:
    """Blocks whose family a `family_overrides` entry names: the user chose for them."""
    return {b.name for b in blocks
            if family_for(b.name, "", student.family_overrides) != ""}


def time_candidates(teacher, block: Block, found: list, student) -> dict:
    """{"runtime/batch": [ms of each candidate of `found`]}: each alone, its BNs folded, on
    the runtimes of `student.target` at each of its batches (cut by timed_batches), the
    median of as many interleaved rounds as the choice needs (QUICK_ROUNDS at a time until
    settled) within block_timing's budget."""
    check_target(student.target)  # where they run: a worker with no GPU refuses "gpu"
    models = [_deployed(candidate.model(teacher)) for candidate in found]
    measures = [(runtime, batch) for runtime in runtimes(student.target)
                for batch in timed_batches(block, student.latency_batches)]
    with contextlib.ExitStack() as stack:
        runners = {runtime: stack.enter_context(model_runners(models, runtime))
                   for runtime in runtimes(student.target)}
        timers = {f"{runtime}/{batch}": InterleavedTimer(runners[runtime], block.input_shape,
                                                         batch)
                  for runtime, batch in measures}
        # Rounds of every measure, QUICK_ROUNDS at a time, until the choice is settled or
        # every measure has had the full budget.
        while True:
            for timer in timers.values():
                timer.run(QUICK_ROUNDS)
            timings = {measure: timer.medians() for measure, timer in timers.items()}
            if settled(timings, student.min_speedup) or not any(
                    timer.wants_more() for timer in timers.values()):
                return timings


def relative_times(timings: dict) -> list[float]:
    """Each candidate's time relative to the fastest: the geometric mean over the measures
    of `timings` (time_candidates') of its time over the fastest candidate's there."""
    relative = [1.0] * len(next(iter(timings.values())))
    for times in timings.values():
        for index, ms in enumerate(times):
            relative[index] *= (ms / min(times)) ** (1 / len(timings))
    return relative


def settled(timings: dict, min_speedup: float) -> bool:
    """Whether `timings` leave the choice (_ranked's: the first candidate within
    `min_speedup` of the fastest) in no doubt: the chosen one SETTLED_MARGIN times inside
    that line and every candidate before it that much outside (a later candidate counts
    only as the fastest, and the margin covers a change of it too)."""
    relative = relative_times(timings)
    ratios = [value / min(relative) for value in relative]
    chosen = next(i for i, ratio in enumerate(ratios) if ratio <= min_speedup)
    return ratios[chosen] * SETTLED_MARGIN <= min_speedup and all(
        ratio >= min_speedup * SETTLED_MARGIN for ratio in ratios[:chosen])


def _time_here(teacher, progress=None, reused: int = 0):
    """choose_students' default `time_blocks`: this process, one block after another,
    `progress(done, total, name)` called before each block and `progress(total, total,
    None, reused)` after the last (`reused`: blocks not timed, with the figures of an equal
    one)."""
    def time_blocks(pairs, student):
        timings = {}
        for done, (block, found) in enumerate(pairs):
            if progress is not None:
                progress(done, len(pairs), block.name)
            timings[block.name] = time_candidates(teacher, block, found, student)
        if progress is not None:
            progress(len(pairs), len(pairs), None, reused)
        return timings, f"this process ({intra_op_threads()} threads)"
    return time_blocks


def timing_groups(teacher, pairs, batches) -> dict[str, str]:
    """{block name: the first block of `pairs` (each a block and its candidates) whose
    candidates are the same as its own}: the same student forms of equal blocks (shapes,
    strides, widths, endings) and, for the teacher's block, operations of equal
    configurations on equal input shapes (graph.block_structures): the repeated blocks of
    a stage. Their times differ by noise alone, so they are timed once. `teacher`: flat."""
    structures = block_structures(teacher, [block for block, found in pairs
                                            if any(c.keeps_teacher for c in found)])
    first_of, same_as = {}, {}
    for block, found in pairs:
        key = json_key([[structures[block.name] if c.keeps_teacher else _unnamed(c)
                         for c in found], timed_batches(block, batches)])
        same_as[block.name] = first_of.setdefault(key, block.name)
    return same_as


def _unnamed(candidate: Candidate) -> dict:
    """A student candidate as build_student_model sees it, less the names it gives."""
    return {k: v for k, v in candidate.block.to_dict().items()
            if k not in ("name", "layers", "input_boundary", "output_boundary")} | {
        "depth_multiplier": candidate.depth_multiplier}


def timing_summary(record: dict) -> str:
    """How long the timing took, where, and how many blocks it timed: `timed in 41.2 s on
    this process (2 threads), 21 distinct blocks of 57 (the rest reuse an equal block's
    figures)`."""
    timed = record.get("timed_blocks")
    total = sum(1 for row in record["blocks"] if "latency_ms" in row["candidates"][0])
    return (f"timed in {record['seconds']:.1f} s on {record['timed_on']}"
            + (f", {timed} distinct blocks of {total} (the rest reuse an equal block's "
               f"figures)" if timed is not None and timed < total else ""))


def _ranked(block: Block, found: list, timings: dict | None, job) -> dict:
    """The report's row of `block`: its candidates, the objective's choice first; with
    `timings` (time_candidates'), each candidate's times and relative time."""
    student = job.student
    rows = [candidate.to_dict() | {"published": candidate == Candidate(
                block, student.depth_multiplier)} for candidate in found]
    if timings:
        for measure, times in timings.items():
            for row, ms in zip(rows, times):
                row.setdefault("latency_ms", {})[measure] = ms
        relative = relative_times(timings)
        for row, value in zip(rows, relative):
            row["relative_time"] = value
        # The most accurate (the first) within min_speedup of the fastest: timing noise
        # and the accuracy of other forms (module docstring) are not worth a few percent.
        first = next(i for i, value in enumerate(relative)
                     if value <= student.min_speedup * min(relative))
        rows.insert(0, rows.pop(first))
    elif student.objective == "flops":
        rows.sort(key=lambda row: row["flops"])
    return {"name": block.name, "budget_params": Candidate(
        block, student.depth_multiplier).cost[0], "candidates": rows}


def timed_batches(block: Block, batches) -> list[int]:
    """`batches`, each cut so that one call of the teacher's block stays within
    MAX_TIMED_FLOPS (at least 1; repeats dropped)."""
    fit = max(1, int(MAX_TIMED_FLOPS // max(1, block.teacher_flops)))
    return list(dict.fromkeys(min(batch, fit) for batch in batches))


def _deployed(model):
    """A candidate as it runs in the saved student: its BNs folded (model/fold.py; in
    Keras an unfolded BN is one more pass over the tensor, a third of the demo student's
    gain at batch 32)."""
    inputs = np.random.default_rng(0).uniform(size=(4, *model.input_shape[1:]))
    return fold_batchnorm(model, inputs.astype(np.float32))[0]


def from_record(blocks, record: dict, widen: int) -> StudentChoice:
    """The StudentChoice a record (report.json's `students`) describes: the blocks whose
    first candidate is a student, that student first; its retry the published student
    when another went first, else the first at `widen` times its multiplier (none at
    all when every block keeps the teacher's: nothing_to_train)."""
    by_name = {row["name"]: row for row in record["blocks"]}
    chosen, multipliers, retries = [], {}, {}
    for block in blocks:
        rows = by_name[block.name]["candidates"]
        first = Candidate.from_dict(block, rows[0])
        if first.keeps_teacher:
            continue
        chosen.append(first.block)
        multipliers[block.name] = first.depth_multiplier
        retries[block.name] = (
            Candidate(first.block, first.depth_multiplier * widen) if rows[0]["published"]
            else Candidate.from_dict(block, next(row for row in rows if row["published"])))
    return StudentChoice(tuple(chosen), multipliers, retries, record)


def nothing_to_train(choice: StudentChoice) -> str | None:
    """Why a run of `choice` would distil nothing (every block keeps the teacher's
    layers), with the options; None when some block has a student."""
    if choice.blocks:
        return None
    record = choice.record
    return (f"No block has a student faster than its teacher block on {record['runtime']} "
            f"by student.min_speedup = {record['min_speedup']}: the student would be the "
            f"teacher. Lower student.min_speedup, choose another student.target or "
            f"student.latency_batches, or set student.objective = \"params\" for the "
            f"published method's smaller students.")


def describe(candidate: Candidate) -> str:
    """A candidate in a few words: `separable x1`, `low_rank r=7 x1`, `teacher's block`."""
    return describe_row(candidate.to_dict())


def describe_row(row: dict) -> str:
    """describe() of a record's candidate row."""
    if row["family"] == TEACHER:
        return "teacher's block"
    rank = f" r={row['width'] * row['depth_multiplier']}" if row["family"] == "low_rank" else ""
    return f"{row['family']}{rank} x{row['depth_multiplier']}"


def _load(path: Path | None, key: str) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: measured again and rewritten
    return record if record.get("key") == key else None
