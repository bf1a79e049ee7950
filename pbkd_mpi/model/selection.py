"""`python -m pbkd_mpi plan`: the block table of a teacher, without training anything."""

from __future__ import annotations

import json

from pbkd_mpi.config import load_job
from pbkd_mpi.errors import UserError
from pbkd_mpi.model.graph import find_blocks
from pbkd_mpi.model.students import family_for, student_cost, with_family, worthwhile


def granularity_of(blocks_config):
    """The job's granularity: the explicit [first, last] pairs when there are any."""
    if not blocks_config.explicit:
        return blocks_config.granularity
    pairs = []
    for item in blocks_config.explicit:
        first, sep, last = item.partition(":")
        if not sep or not first or not last:
            raise UserError(
                f"blocks.explicit expects entries \"first_layer:last_layer\", received {item!r}."
            )
        pairs.append((first, last))
    return pairs


def select_blocks(teacher, granularity="layer", depth_multiplier: int = 1,
                  family: str = "separable", width_multiplier: float = 1.0,
                  family_overrides=()) -> list:
    """The blocks that become tasks: those found at `granularity` whose student (of the
    given family, or the first `"pattern=family"` override matching the block's name, and
    width) is smaller than the teacher block (the others stay the teacher's)."""
    found = [with_family(block, family_for(block.name, family, family_overrides),
                         width_multiplier)
             for block in find_blocks(teacher, granularity)]
    blocks = worthwhile(found, depth_multiplier)
    if not blocks:
        raise UserError(
            f"No block of the teacher {teacher.name!r} at granularity {granularity!r} has a "
            f"student smaller than itself (1x1 convs are already pointwise); try another "
            f"granularity."
        )
    return blocks


def block_table(teacher, depth_multiplier: int = 1, granularity="layer",
                family: str = "separable", width_multiplier: float = 1.0,
                family_overrides=()) -> dict:
    rows = []
    for block in select_blocks(teacher, granularity, depth_multiplier, family,
                               width_multiplier, family_overrides):
        student_params, student_flops = student_cost(block, depth_multiplier)
        rows.append({
            "name": block.name,
            "kind": block.kind,
            "family": block.family,
            "layers": list(block.layers),
            "input_shape": list(block.input_shape),
            "output_shape": list(block.output_shape),
            "final_activation": block.final_activation,
            "teacher_params": block.teacher_params,
            "teacher_flops": block.teacher_flops,
            "student_params": student_params,
            "student_flops": student_flops,
            "params_ratio": student_params / block.teacher_params,
            "flops_ratio": student_flops / max(block.teacher_flops, 1),
        })
    totals = {key: sum(row[key] for row in rows) for key in
              ("teacher_params", "student_params", "teacher_flops", "student_flops")}
    return {"blocks": rows, "totals": totals}


def _load_plan_teacher(args, job):
    from pbkd_mpi.model.teacher import BUILTIN_TEACHERS, build_builtin, load_model_file

    if args.teacher:
        return load_model_file(args.teacher)
    if job.teacher.source in BUILTIN_TEACHERS:
        # The architecture alone decides the blocks: no need to train it to plan.
        size = tuple(job.data.image_size)
        classes = job.data.demo_classes if job.data.source == "demo" else 10
        return build_builtin(job.teacher.source, (*size, 3), classes, job.teacher.widths)
    return load_model_file(job.teacher.source)


def plan_command(args) -> int:
    job = load_job(args.job, args.set)
    # --granularity (when the command line offers it) wins over the job's [blocks].
    granularity = getattr(args, "granularity", None) or granularity_of(job.blocks)
    table = block_table(_load_plan_teacher(args, job), job.student.depth_multiplier, granularity,
                        job.student.family, job.student.width_multiplier,
                        job.student.family_overrides)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    header = ("block", "layers", "in", "out", "end", "T params", "S params", "T FLOPs", "S FLOPs")
    rows = [
        (r["name"], _layers_text(r["layers"]), "x".join(map(str, r["input_shape"])),
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


def _layers_text(names) -> str:
    """All names of a short block; the first and last (and how many) of a long one."""
    if len(names) <= 3:
        return ",".join(names)
    return f"{names[0]}..{names[-1]} ({len(names)})"
