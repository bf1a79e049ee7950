"""Which blocks of the teacher become tasks, and the block table `plan` prints."""

from __future__ import annotations

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


def job_blocks(teacher, job, granularity=None) -> list:
    """`select_blocks` as the job's [blocks] and [student] say (`granularity` overrides)."""
    student = job.student
    return select_blocks(teacher, granularity or granularity_of(job.blocks),
                         student.depth_multiplier, student.family, student.width_multiplier,
                         student.family_overrides)


def block_table(teacher, depth_multiplier: int = 1, granularity="layer",
                family: str = "separable", width_multiplier: float = 1.0,
                family_overrides=()) -> dict:
    """Per block: its layers, shapes and the teacher's and student's parameters and FLOPs."""
    return block_table_of(select_blocks(teacher, granularity, depth_multiplier, family,
                                        width_multiplier, family_overrides), depth_multiplier)


def block_table_of(blocks, depth_multiplier: int) -> dict:
    rows = []
    for block in blocks:
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
