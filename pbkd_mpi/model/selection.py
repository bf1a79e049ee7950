"""Which blocks of the teacher become tasks, and the block table `plan` prints."""

from __future__ import annotations

from pbkd_mpi.errors import UserError
from pbkd_mpi.model.allocation import allocate_by_spectrum
from pbkd_mpi.model.graph import find_blocks
from pbkd_mpi.model.students import family_for, is_smaller, student_cost, with_family


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
                  family_overrides=(), *, fallback: str = "low_rank",
                  target: float | None = None, max_share: float = 1.0,
                  allocation: str = "uniform") -> list:
    """The blocks that become tasks: those found at `granularity` whose student (of the
    given family, or the first `"pattern=family"` override matching the block's name, and
    width, or `target` share of the block's parameters) is smaller than the teacher block;
    where it is not, the `fallback` family's student if that one is (else the block stays
    the teacher's). At `stage` granularity a stage over `max_share` of the parameters is
    cut back into its blocks. `allocation = "spectrum"` re-shares a target between the
    low-rank students of single convs (model/allocation.py)."""
    found = _found_blocks(teacher, granularity, max_share)
    blocks = []
    for block in found:
        chosen = family_for(block.name, family, family_overrides)
        for choice in dict.fromkeys([chosen, fallback]):
            if choice == "none":
                continue
            candidate = with_family(block, choice, width_multiplier, depth_multiplier, target)
            if is_smaller(candidate, depth_multiplier):
                blocks.append(candidate)
                break
    if not blocks:
        raise UserError(
            f"No block of the teacher {teacher.name!r} at granularity {granularity!r} has a "
            f"student smaller than itself in family {family!r} or {fallback!r}; try another "
            f"granularity or student.fallback_family = \"low_rank\"."
        )
    if target and allocation == "spectrum":
        return allocate_by_spectrum(blocks, teacher, target, depth_multiplier)
    return blocks


def _found_blocks(teacher, granularity, max_share: float) -> list:
    found = find_blocks(teacher, granularity)
    if granularity != "stage":
        return found
    total = sum(block.teacher_params for block in found)
    inner = find_blocks(teacher, "block")
    kept = []
    for block in found:
        if block.teacher_params > max_share * total and block.repeats > 1:
            members = set(block.layers)
            kept.extend(b for b in inner if set(b.layers) <= members)
        else:
            kept.append(block)
    return kept


def plan_warnings(blocks, depth_multiplier: int, max_share: float, min_ratio: float) -> list:
    """What a user should know before distilling these blocks: a block too big to learn
    alone, a student too small to learn its block."""
    total = sum(block.teacher_params for block in blocks)
    warnings = []
    for block in blocks:
        share = block.teacher_params / max(total, 1)
        if share > max_share:
            warnings.append(
                f"block {block.name!r} holds {share:.0%} of the parameters in blocks "
                f"({len(block.layers)} layers) and has no inner cut point to split it at; "
                f"name smaller blocks with blocks.explicit, or use granularity \"layer\".")
        ratio = student_cost(block, depth_multiplier)[0] / max(block.teacher_params, 1)
        if ratio < min_ratio:
            warnings.append(
                f"block {block.name!r}: its student has {ratio:.2%} of the block's "
                f"parameters (under student.min_ratio {min_ratio}) and is unlikely to learn "
                f"it; raise student.target_params or use a finer granularity.")
    return warnings


def job_blocks(teacher, job, granularity=None) -> list:
    """`select_blocks` as the job's [blocks] and [student] say (`granularity` overrides)."""
    student = job.student
    return select_blocks(teacher, granularity or granularity_of(job.blocks),
                         student.depth_multiplier, student.family, student.width_multiplier,
                         student.family_overrides, fallback=student.fallback_family,
                         target=student.target_params or None,
                         max_share=job.blocks.max_share, allocation=student.allocation)


def job_warnings(blocks, job) -> list:
    """`plan_warnings` with the job's limits."""
    return plan_warnings(blocks, job.student.depth_multiplier, job.blocks.max_share,
                         job.student.min_ratio)


def block_table(teacher, depth_multiplier: int = 1, granularity="layer",
                family: str = "separable", width_multiplier: float = 1.0,
                family_overrides=()) -> dict:
    """Per block: its layers, shapes and the teacher's and student's parameters and FLOPs."""
    return block_table_of(select_blocks(teacher, granularity, depth_multiplier, family,
                                        width_multiplier, family_overrides), depth_multiplier)


def block_table_of(blocks, depth_multiplier: int | dict) -> dict:
    """The table of `blocks`; `depth_multiplier`: one for all, or {block name: multiplier}
    (model/choice.StudentChoice.multipliers)."""
    rows = []
    for block in blocks:
        multiplier = (depth_multiplier[block.name] if isinstance(depth_multiplier, dict)
                      else depth_multiplier)
        student_params, student_flops = student_cost(block, multiplier)
        rows.append({
            "name": block.name,
            "kind": block.kind,
            "family": block.family,
            "width": block.width,
            "depth_multiplier": multiplier,
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
