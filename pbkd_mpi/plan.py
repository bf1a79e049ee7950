"""`python -m pbkd_mpi plan`: the block table of a teacher, without training anything."""

from __future__ import annotations

import json
from pathlib import Path

from .config import load_job
from .cost import layers_cost
from .graph import find_blocks
from .students import build_student_model


def block_table(teacher, depth_multiplier: int = 1) -> dict:
    rows = []
    for block in find_blocks(teacher):
        student = build_student_model(block, depth_multiplier)
        student_params, student_flops = layers_cost(student.layers[1:])
        rows.append({
            "name": block.name,
            "layers": list(block.layers),
            "input_shape": list(block.input_shape),
            "output_shape": list(block.output_shape),
            "final_activation": block.final_activation,
            "teacher_params": block.teacher_params,
            "teacher_flops": block.teacher_flops,
            "student_params": student_params,
            "student_flops": student_flops,
        })
    totals = {key: sum(row[key] for row in rows) for key in
              ("teacher_params", "student_params", "teacher_flops", "student_flops")}
    return {"blocks": rows, "totals": totals}


def _load_plan_teacher(args, job):
    from .teacher import BUILTIN_TEACHERS, build_vgg_demo, load_model_file

    if args.teacher:
        return load_model_file(args.teacher)
    if job.teacher.source in BUILTIN_TEACHERS:
        # The architecture alone decides the blocks: no need to train it to plan.
        size = tuple(job.data.image_size)
        classes = job.data.demo_classes if job.data.source == "demo" else 10
        return build_vgg_demo((*size, 3), classes, job.teacher.widths)
    return load_model_file(job.teacher.source)


def plan_command(args) -> int:
    job = load_job(args.job, args.set)
    table = block_table(_load_plan_teacher(args, job), job.student.depth_multiplier)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    header = ("block", "layers", "in", "out", "end", "T params", "S params", "T FLOPs", "S FLOPs")
    rows = [
        (r["name"], ",".join(r["layers"]), "x".join(map(str, r["input_shape"])),
         "x".join(map(str, r["output_shape"])), r["final_activation"],
         str(r["teacher_params"]), str(r["student_params"]), str(r["teacher_flops"]),
         str(r["student_flops"]))
        for r in table["blocks"]
    ]
    t = table["totals"]
    rows.append(("total", "", "", "", "", str(t["teacher_params"]), str(t["student_params"]),
                 str(t["teacher_flops"]), str(t["student_flops"])))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"student/teacher in blocks: params {t['student_params'] / t['teacher_params']:.3f}, "
          f"FLOPs {t['student_flops'] / t['teacher_flops']:.3f}")
    return 0
