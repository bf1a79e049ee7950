"""report.json (the contract other tools read, documented in docs/report.md) and report.md."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(run_dir: Path, report: dict) -> tuple[Path, Path]:
    json_path, md_path = Path(run_dir) / "report.json", Path(run_dir) / "report.md"
    write_atomically(json_path, json.dumps(report, indent=2) + "\n")
    write_atomically(md_path, render_markdown(report))
    return json_path, md_path


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
            **timing,
            **{key: result[key] for key in (
                "train_mse", "val_mse", "initial_val_mse", "target_variance", "epochs",
                "best_epoch", "student_params", "student_flops", "history",
                "resumed_from_epoch")},
            "teacher_params": block.teacher_params,
            "teacher_flops": block.teacher_flops,
            "input_shape": list(block.input_shape),
            "output_shape": list(block.output_shape),
            "final_activation": block.final_activation,
        })
    return rows


def replaced_totals(rows) -> dict:
    totals = {key: sum(row[key] for row in rows) for key in
              ("teacher_params", "student_params", "teacher_flops", "student_flops")}
    # No replaced block at all (every task failed): there is no ratio to give.
    totals["param_ratio"] = (totals["student_params"] / totals["teacher_params"]
                             if totals["teacher_params"] else None)
    totals["flop_ratio"] = (totals["student_flops"] / totals["teacher_flops"]
                            if totals["teacher_flops"] else None)
    return totals


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _count(value) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return str(value)


def render_markdown(report: dict) -> str:
    teacher, student, replaced = report["teacher"], report["student"], report["replaced"]
    lines = [
        f"# Distillation report: {teacher['source']}",
        "",
        f"Status **{report['status']}**, {report['workers']} worker rank(s), "
        f"run directory `{report['run_dir']}`, total wall time {report['wall_s']:.1f} s.",
        "",
        "## Summary",
        "",
        "| | teacher | student | student / teacher |",
        "|---|---|---|---|",
        f"| parameters | {_count(teacher['params'])} | {_count(student['params'])} | "
        f"{student['params'] / teacher['params']:.2f} |",
        f"| FLOPs per image | {_count(teacher['flops'])} | {_count(student['flops'])} | "
        f"{student['flops'] / teacher['flops']:.2f} |",
        f"| parameters in replaced blocks | {_count(replaced['teacher_params'])} | "
        f"{_count(replaced['student_params'])} | {_ratio(replaced['param_ratio'])} |",
        f"| FLOPs in replaced blocks | {_count(replaced['teacher_flops'])} | "
        f"{_count(replaced['student_flops'])} | {_ratio(replaced['flop_ratio'])} |",
        f"| test accuracy | {_pct(teacher['accuracy'])} | {_pct(student['accuracy_finetuned'])} "
        f"(merged, before fine-tuning: {_pct(student['accuracy_merged'])}) | |",
        "",
        "Accuracies are measured on the held-out test split; every selection (block early "
        "stopping, fine-tuning epochs) used the validation split.",
        "",
        "## Phases",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.1f} |" for name, seconds in report["phases"].items()),
        "",
        f"Distillation makespan {report['distill']['makespan_s']:.1f} s for "
        f"{report['distill']['sum_task_s']:.1f} s of block tasks "
        f"({report['distill']['sum_task_s'] / max(report['distill']['makespan_s'], 1e-9):.2f}x "
        f"the sequential sum) on {report['workers']} worker(s); the coordinator used "
        f"{_pct(report['distill']['coordinator_cpu_fraction'])} of a core while it waited. "
        f"{report['distill']['reused_blocks']} block(s) were reused from an earlier run in "
        f"this run directory and are not counted.",
        "",
        "## Blocks",
        "",
        "Relative MSE is the validation MSE divided by the variance of the teacher block's "
        "output: 1.0 would be no better than predicting its mean. `start` is the relative "
        "MSE of the student initialised from the teacher's factorised kernel, before training.",
        "",
        "| block | layers | in -> out | rank | seconds | epochs | train MSE | val MSE "
        "| relative MSE (start) | params T -> S | FLOPs T -> S |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block in report["blocks"]:
        variance = block["target_variance"] or 1.0
        lines.append(
            f"| {block['name']} | {', '.join(block['layers'])} | "
            f"{'x'.join(map(str, block['input_shape']))} -> "
            f"{'x'.join(map(str, block['output_shape']))} | {block['rank']} | "
            f"{block['seconds']:.1f}{' (reused)' if block['reused'] else ''} | "
            f"{block['epochs']} | {block['train_mse']:.4g} | "
            f"{block['val_mse']:.4g} | {block['val_mse'] / variance:.3f} "
            f"({block['initial_val_mse'] / variance:.3f}) | "
            f"{_count(block['teacher_params'])} -> {_count(block['student_params'])} | "
            f"{_count(block['teacher_flops'])} -> {_count(block['student_flops'])} |"
        )
    if report["failed_blocks"]:
        lines += ["", "## Failed blocks (kept the teacher's layers)", "",
                  "| block | attempts | last error (rank) |", "|---|---|---|"]
        lines += [f"| {f['name']} | {f['attempts']} | {f['errors'][-1]['error']} "
                  f"({f['errors'][-1]['rank']}) |" for f in report["failed_blocks"]]
    finetune = report["finetune"]
    lines += [
        "",
        "## Fine-tuning",
        "",
        f"{finetune['epochs']} epoch(s) run; validation accuracy {_pct(finetune['val_accuracy_before'])} "
        f"before and {_pct(finetune['val_accuracy'])} after (best epoch {finetune['best_epoch']}; "
        f"0 means the merged student was kept).",
        "",
        f"Student model: `{student['path']}`.",
        "",
    ]
    return "\n".join(lines)
