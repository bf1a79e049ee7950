"""`python -m pbkd_mpi plan`: the block table of a teacher, without training anything."""

from __future__ import annotations

import json
import sys
import time

from pbkd_mpi.config import load_job
from pbkd_mpi.keys import model_fingerprint
from pbkd_mpi.model.choice import choose_students, nothing_to_train, timing_summary
from pbkd_mpi.model.selection import block_table_of, job_blocks, job_warnings
from pbkd_mpi.model.teacher import BUILTIN_TEACHERS, build_builtin, load_model_file
from pbkd_mpi.output.report import describe_record

# Without a terminal, a progress line at most this often (and the first and last).
PROGRESS_EVERY_S = 10.0
HEADER = ("block", "layers", "in", "out", "end", "family", "width", "mult", "T params",
          "S params", "T FLOPs", "S FLOPs")


def plan_command(args) -> int:
    job = load_job(args.job, args.set)
    # --granularity (when the command line offers it) wins over the job's [blocks].
    teacher = _teacher(args, job)
    # Nothing is written: `run` times the candidates again in its own run directory.
    choice = choose_students(teacher, job_blocks(teacher, job, getattr(args, "granularity", None)),
                             job, model_fingerprint(teacher), None, lambda message: None,
                             progress=progress_printer(sys.stderr))
    table = block_table_of(choice.blocks, choice.multipliers)
    table["target_params"] = job.student.target_params or None
    table["warnings"] = job_warnings(choice.blocks, job) + [
        why for why in [nothing_to_train(choice)] if why]
    table["students"] = choice.record
    print(json.dumps(table, indent=2) if args.json else render_table(table))
    return 0


def progress_printer(stream):
    """choose_students' `progress` for `plan`: on `stream` (stderr: stdout carries the
    table or --json's JSON alone), one status line rewritten in place on a terminal, else
    a line when timing starts, at most every PROGRESS_EVERY_S, and at the end."""
    tty = stream.isatty()
    started, last = time.perf_counter(), [float("-inf")]

    def progress(done: int, total: int, name: str | None, reused: int = 0) -> None:
        now = time.perf_counter()
        if name is None:
            text = (f"timing candidates: {total} block(s) timed in {now - started:.0f} s"
                    + (f", {reused} more with the figures of an equal block" if reused
                       else ""))
        else:
            text = f"timing candidates: block {done + 1}/{total} ({name}), {now - started:.0f} s"
        if tty:
            stream.write(f"\r\033[K{text}" + ("\n" if name is None else ""))
        elif name is None or now - last[0] >= PROGRESS_EVERY_S:
            stream.write(text + "\n")
            last[0] = now
        stream.flush()
    return progress


def _teacher(args, job):
    if args.teacher:
        return load_model_file(args.teacher)
    if job.teacher.source in BUILTIN_TEACHERS:
        # The architecture alone decides the blocks: no need to train it to plan.
        size = tuple(job.data.image_size)
        classes = job.data.demo_classes if job.data.source == "demo" else 10
        return build_builtin(job.teacher.source, (*size, 3), classes, job.teacher.widths)
    return load_model_file(job.teacher.source)


def render_table(table: dict) -> str:
    rows = [
        (r["name"], _layers_text(r["layers"]), "x".join(map(str, r["input_shape"])),
         "x".join(map(str, r["output_shape"])), r["final_activation"], r["family"],
         str(r["width"]), str(r["depth_multiplier"]), str(r["teacher_params"]),
         str(r["student_params"]),
         str(r["teacher_flops"]), str(r["student_flops"]))
        for r in table["blocks"]
    ]
    t = table["totals"]
    rows.append(("total", "", "", "", "", "", "", "", str(t["teacher_params"]),
                 str(t["student_params"]), str(t["teacher_flops"]), str(t["student_flops"])))
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [HEADER, *rows]]
    if t["teacher_params"]:  # none when every block keeps the teacher's layers
        lines.append(f"student/teacher in blocks: params "
                     f"{t['student_params'] / t['teacher_params']:.3f}, FLOPs "
                     f"{t['student_flops'] / t['teacher_flops']:.3f}"
                     + (f" (student.target_params {table['target_params']})"
                        if table.get("target_params") else ""))
    if table.get("students"):
        lines.extend(describe_record(table["students"]))
        if table["students"].get("timed_on"):
            lines.append(f"students: {timing_summary(table['students'])}")
    lines.extend(f"warning: {warning}" for warning in table.get("warnings", ()))
    return "\n".join(lines)


def _layers_text(names) -> str:
    """All names of a short block; the first and last (and how many) of a long one."""
    if len(names) <= 3:
        return ",".join(names)
    return f"{names[0]}..{names[-1]} ({len(names)})"
