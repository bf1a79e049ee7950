"""Which student each block gets: `student.objective` over the block's candidates.

The job's family and depth multiplier give each block its published student (the
`params` objective's choice) and with it the block's parameter budget. The candidates are
students of about that size in other forms: the published one and the dense low-rank
student of the largest rank within the budget. (Smaller students are not candidates: the
separable student at depth multiplier 1 runs 2x faster but, measured on the demo, cost 4
of 6 blocks more than 3 points of accuracy alone and the deep job 5 points after
fine-tuning.) `latency` ranks them by their time alone on the job's target
(block_timing.py), but puts the published student ahead of any candidate not at least
`student.min_speedup` times faster (at equal parameters the low-rank students of the deep
job ran 3-15% faster and learned their blocks to 2-2.7x the relative error); `flops`
ranks by FLOPs. The first is trained. Acceptance's retry is the next one when the first
is not the published student, else the wider published student (as under `params`): a
candidate ranked after the published student is not more accurate, only slower.

The choice is made once per run directory and kept in RUN/students.json: timings vary
from run to run, and a resumed run must train the students its finished results belong to.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pbkd_mpi import atomic
from pbkd_mpi.keys import json_key
from pbkd_mpi.model.block_timing import check_target, runtime_label, time_models
from pbkd_mpi.model.graph import Block
from pbkd_mpi.model.students import build_student_model, family_for, student_cost

CHOICE_FILE = "students.json"


@dataclass(frozen=True)
class Candidate:
    """One student of a block: its family and width (in `block`) and depth multiplier."""

    block: Block
    depth_multiplier: int

    @property
    def cost(self) -> tuple[int, int]:
        return student_cost(self.block, self.depth_multiplier)

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

    blocks: tuple  # each block with the family and width of its first student
    multipliers: dict  # block name -> the first student's depth multiplier
    retries: dict  # block name -> Candidate: acceptance's second try
    record: dict  # report.json's `students`

    def candidate(self, block: Block) -> Candidate:
        return Candidate(block, self.multipliers[block.name])

    @classmethod
    def published(cls, blocks, depth_multiplier: int, widen: int) -> StudentChoice:
        """The `params` objective's choice: every block's own student, retried wider."""
        return cls(tuple(blocks), {b.name: depth_multiplier for b in blocks},
                   {b.name: Candidate(b, depth_multiplier * widen) for b in blocks},
                   {"objective": "params", "blocks": []})


def candidates(block: Block, depth_multiplier: int, pinned: bool = False) -> list[Candidate]:
    """The students of `block` about its published student's size and within it, that one
    first; `pinned` (a family the user named for this block): that one alone."""
    published = Candidate(block, depth_multiplier)
    if pinned:
        return [published]
    budget = published.cost[0]
    if block.family != "low_rank" and (low_rank := _low_rank_within(block, budget)):
        return [published, low_rank]
    return [published]


def _low_rank_within(block: Block, budget: int) -> Candidate | None:
    """The widest low-rank student of `block` with at most `budget` parameters."""
    one = student_cost(replace(block, family="low_rank", width=1))[0]
    two = student_cost(replace(block, family="low_rank", width=2))[0]
    if one > budget or two <= one:
        return None
    width = 1 + (budget - one) // (two - one)
    return Candidate(replace(block, family="low_rank", width=int(width)), 1)


def choose_students(blocks, job, teacher_fingerprint: str, run_dir, log) -> StudentChoice:
    """The job's choice for `blocks` (model/selection.job_blocks), made once per run
    directory: a RUN/students.json of the same blocks, settings and teacher is reused."""
    student = job.student
    key = json_key({"teacher": teacher_fingerprint, "blocks": [b.to_dict() for b in blocks],
                    "student": {k: getattr(student, k) for k in (
                        "objective", "target", "latency_batch", "min_speedup",
                        "depth_multiplier", "family_overrides")},
                    "widen": job.accept.widen})
    path = Path(run_dir) / CHOICE_FILE if run_dir is not None else None
    saved = _load(path, key)
    if saved is not None:
        log(f"students: the choice of an earlier run ({path}), {student.objective} "
            f"objective")
        return from_record(blocks, saved, job.accept.widen)
    started = time.perf_counter()
    if student.objective == "latency":
        check_target(student.target)
    rows = [_ranked(block, job, block.name in _pinned(blocks, student)) for block in blocks]
    record = {"objective": student.objective, "key": key,
              "target": student.target if student.objective == "latency" else None,
              "runtime": (runtime_label(student.target)
                          if student.objective == "latency" else None),
              "batch": student.latency_batch if student.objective == "latency" else None,
              "seconds": time.perf_counter() - started,
              "blocks": rows}
    if path is not None:
        atomic.write_text(path, json.dumps(record, indent=1))
    choice = from_record(blocks, record, job.accept.widen)
    log(f"students ({student.objective}"
        + (f", {record['runtime']}, batch {record['batch']}, timed in "
           f"{record['seconds']:.1f} s" if record["runtime"] else "") + "): "
        + ", ".join(f"{b.name} {describe(choice.candidate(b))}" for b in choice.blocks))
    return choice


def _pinned(blocks, student) -> set:
    """Blocks whose family a `family_overrides` entry names: the user chose for them."""
    return {b.name for b in blocks
            if family_for(b.name, "", student.family_overrides) != ""}


def _ranked(block: Block, job, pinned: bool) -> dict:
    """The report's row of `block`: its candidates in the objective's order, timed when
    the objective is latency."""
    student = job.student
    found = candidates(block, student.depth_multiplier,
                       pinned or student.objective == "params")
    rows = [candidate.to_dict() | {"published": index == 0}
            for index, candidate in enumerate(found)]
    if student.objective == "latency" and len(found) > 1:
        models = [build_student_model(c.block, c.depth_multiplier) for c in found]
        times = time_models(models, block.input_shape, student.target, student.latency_batch)
        for row, ms in zip(rows, times):
            row["latency_ms"] = ms
        published = times[0]
        # Ahead of the published student only when clearly faster: timing noise and the
        # accuracy of other forms (module docstring) are not worth a few percent.
        rows.sort(key=lambda row: (not (row["published"] or
                                        row["latency_ms"] * student.min_speedup <= published),
                                   row["latency_ms"]))
    elif student.objective == "flops":
        rows.sort(key=lambda row: row["flops"])
    return {"name": block.name, "budget_params": found[0].cost[0], "candidates": rows}


def from_record(blocks, record: dict, widen: int) -> StudentChoice:
    """The StudentChoice a record (report.json's `students`) describes: each block's first
    candidate; its retry the second when the first is not the published student, else the
    first at `widen` times its multiplier."""
    by_name = {row["name"]: row for row in record["blocks"]}
    chosen, multipliers, retries = [], {}, {}
    for block in blocks:
        rows = by_name[block.name]["candidates"]
        first = Candidate.from_dict(block, rows[0])
        chosen.append(first.block)
        multipliers[block.name] = first.depth_multiplier
        retries[block.name] = (
            Candidate(first.block, first.depth_multiplier * widen) if rows[0]["published"]
            else Candidate.from_dict(block, rows[1]))
    return StudentChoice(tuple(chosen), multipliers, retries, record)


def describe(candidate: Candidate) -> str:
    """A candidate in a few words: `separable x1`, `low_rank r=7 x1`."""
    block = candidate.block
    rank = (f" r={block.width * candidate.depth_multiplier}" if block.family == "low_rank"
            else "")
    return f"{block.family}{rank} x{candidate.depth_multiplier}"


def describe_record(record: dict) -> list[str]:
    """The choice in lines of text, for `plan` and report.md: each block's candidates in
    the objective's order, the first chosen."""
    lines = [f"students: objective {record['objective']}"
             + (f", timed on {record['runtime']} at batch {record['batch']}"
                if record.get("runtime") else "") + " (* the `family` student)"]
    for row in record["blocks"]:
        parts = []
        for candidate in row["candidates"]:
            text = (f"{candidate['family']}{'*' if candidate.get('published') else ''} "
                    f"w={candidate['width']} "
                    f"x{candidate['depth_multiplier']} {candidate['params']} params")
            if "latency_ms" in candidate:
                text += f" {candidate['latency_ms']:.4g} ms"
            parts.append(text)
        lines.append(f"  {row['name']}: " + " > ".join(parts) if len(parts) > 1 else
                     f"  {row['name']}: {parts[0]} (the only candidate)")
    return lines


def _load(path: Path | None, key: str) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: measured again and rewritten
    return record if record.get("key") == key else None
