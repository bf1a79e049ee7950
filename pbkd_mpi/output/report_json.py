"""report.json's contents, from the values the stages of a run return (keys: docs/report.md)."""

from __future__ import annotations

from pbkd_mpi.config import GateConfig
from pbkd_mpi.distill.accept import ACCEPTED_WIDER, KEPT_TEACHER
from pbkd_mpi.gate import check_gate
from pbkd_mpi.model.cost import model_flops
from pbkd_mpi.output.energy import aggregate

DECISIONS = ("accepted", "accepted_wider", "kept_teacher")


def block_rows(blocks, results: dict, records, reused: dict) -> list[dict]:
    """One report row per block: trained in this run (`results`, `records`) or reused
    from an earlier run (`reused`: {name: (result, info)})."""
    by_name = {record.task_id: record for record in records}
    rows = []
    for block in blocks:
        if block.name in results:
            result, record = results[block.name], by_name[block.name]
            timing = {"rank": record.rank, "seconds": record.end_s - record.start_s,
                      "start_s": record.start_s, "end_s": record.end_s, "reused": False}
        else:
            result, info = reused[block.name]
            timing = {"rank": info["rank"], "seconds": info["seconds"], "start_s": None,
                      "end_s": None, "reused": True}
        rows.append({
            "name": block.name,
            "layers": list(block.layers),
            "family": block.family,
            "width": block.width,
            **timing,
            **{key: result[key] for key in (
                "train_mse", "val_mse", "initial_val_mse", "target_variance", "epochs",
                "best_epoch", "student_params", "student_flops", "history",
                "resumed_from_epoch")},
            "teacher_params": block.teacher_params,
            "teacher_flops": block.teacher_flops,
            "param_ratio": result["student_params"] / block.teacher_params,
            "flop_ratio": result["student_flops"] / block.teacher_flops,
            "input_shape": list(block.input_shape),
            "output_shape": list(block.output_shape),
            "final_activation": block.final_activation,
        })
    return rows


def schedule_figures(plan, records, workers: int, makespan_s: float, profile: dict,
                     predicted_s: float) -> tuple[dict, dict]:
    """(`schedule`, the scheduling keys of `distill`) for report.json, from the plan the
    run followed and its task records (mpi/protocol.TaskRecord)."""
    tasks = sorted(records, key=lambda r: (r.start_s, r.task_id))
    # Worker-seconds: a task split over k workers kept k of them busy for its time.
    busy = sum(len(r.ranks or (r.rank,)) * r.seconds for r in tasks)
    longest = max((r.seconds for r in tasks), default=0.0)
    bound = max(busy / workers, longest)
    schedule = {
        "policy": plan.policy,
        "split": {name: k for name, k in plan.ways.items() if k > 1},
        "profile_method": profile.get("method"),
        "predicted_makespan_s": predicted_s,
        "estimated_lower_bound_s": plan.lower_bound_s,
        "tasks": [{"name": r.task_id, "ranks": list(r.ranks or (r.rank,)),
                   "start_s": r.start_s, "end_s": r.end_s, "estimated_s": r.estimated_s,
                   "measured_s": r.seconds,
                   **({"replicas_identical": r.replicas_identical} if len(r.ranks) > 1 else {})}
                  for r in tasks],
    }
    distill = {
        "sum_task_s": busy,
        "lower_bound_s": bound,
        "efficiency": busy / (workers * makespan_s) if makespan_s > 0 else None,
    }
    return schedule, distill


def replaced_totals(rows) -> dict:
    totals = {key: sum(row[key] for row in rows) for key in
              ("teacher_params", "student_params", "teacher_flops", "student_flops")}
    # No replaced block at all (every task failed): there is no ratio to give.
    totals["param_ratio"] = (totals["student_params"] / totals["teacher_params"]
                             if totals["teacher_params"] else None)
    totals["flop_ratio"] = (totals["student_flops"] / totals["teacher_flops"]
                            if totals["teacher_flops"] else None)
    return totals


def build_report(*, run_dir, workers: int, dataset, teacher, teacher_info: dict,
                 teacher_fingerprint: str, student, student_path, assembled_path,
                 accuracies: dict, acceptance, max_drop: float, tasks, blocks, phases: dict, deployment: dict,
                 cache_info: dict, energy_snapshots, tuned: dict, chained, wall_s: float,
                 memory: dict | None = None, gate: GateConfig | None = None,
                 students: dict | None = None, problems: list | None = None,
                 warnings: list | None = None) -> dict:
    """The report of a finished run. `acceptance`: distill/accept.Acceptance; `tasks`: the
    run's distill/tasks.BlockTasks; `blocks`: each with the student it kept;
    `accuracies`: model/evaluate.test_accuracies; `students`: model/choice's record;
    `gate`: the job's quality gate, judged on the report's own figures (gate.py);
    `problems`: the steps after the student existed that failed (output/problems.py);
    `warnings`: what the user should know of the data (model/evaluate.validation_warning)."""
    rows = _block_rows(tasks, blocks, acceptance.verdicts)
    failed = [{"name": name, "attempts": len(errors), "errors": errors}
              for name, errors in tasks.outcome.failures.items()]
    schedule, distill = schedule_figures(
        tasks.plan, tasks.outcome.records, len(tasks.coordinator.task_workers),
        phases["distill"], tasks.profile, tasks.predicted_s)
    report = {
        "status": "degraded" if failed else "ok",
        "run_dir": str(run_dir),
        "workers": workers,
        "data": {**dataset.summary(), "test_split_reads": dataset.test_reads},
        "teacher": {**teacher_info, "params": int(teacher.count_params()),
                    "flops": model_flops(teacher), "accuracy": accuracies["teacher"],
                    "val_accuracy": accuracies["teacher_val"],
                    "fingerprint": teacher_fingerprint},
        "student": {
            "params": int(student.count_params()),
            "flops": model_flops(student),
            "accuracy_merged": accuracies["merged"],
            "accuracy_finetuned": accuracies["finetuned"],
            "val_accuracy_merged": tuned["val_accuracy_before"],
            "val_accuracy_finetuned": tuned["val_accuracy"],
            "path": str(student_path),
            "assembled_path": str(assembled_path),
        },
        "replaced": replaced_totals([row for row in rows if row["replaced"]]),
        "accept": {"max_drop": max_drop,
                   "teacher_val_accuracy": acceptance.teacher_val,
                   "score_seconds": acceptance.score_seconds,
                   "decisions": {d: sum(v.decision == d for v in acceptance.verdicts.values())
                                 for d in DECISIONS}},
        "blocks": rows,
        "students": students,
        "failed_blocks": failed,
        "phases": phases,
        "schedule": schedule,
        "distill": {
            "makespan_s": phases["distill"],
            **distill,
            "reused_blocks": sum(row["reused"] for row in rows),
            "coordinator_cpu_fraction": tasks.coordinator_cpu,
            "coordinator_trains": tasks.rank0_trains,
            "coordinator_trains_why": tasks.rank0_why,
            "max_poll_gap_s": tasks.coordinator.max_poll_gap_s,
        },
        "deployment": deployment,
        "cache": cache_info,
        "memory_budget": memory,
        "energy": aggregate(energy_snapshots) if energy_snapshots else None,
        "finetune": tuned,
        "chained": chained,
        "problems": list(problems or []),
        "warnings": list(warnings or []),
        "wall_s": wall_s,
    }
    report["gate"] = check_gate(gate or GateConfig(), report)
    return report


def _block_rows(tasks, blocks, verdicts) -> list[dict]:
    """One row per trained block, with the student kept (the wider one when acceptance
    chose it); a block acceptance gave back to the teacher keeps its row, not replaced."""
    wider = {name for name, v in verdicts.items() if v.decision == ACCEPTED_WIDER}
    results, records, reused = tasks.kept(wider)
    rows = block_rows([block for block in blocks if block.name in verdicts], results, records,
                      reused)
    for row in rows:
        row["accept"] = verdicts[row["name"]].to_dict()
        row["replaced"] = verdicts[row["name"]].decision != KEPT_TEACHER
    return rows
