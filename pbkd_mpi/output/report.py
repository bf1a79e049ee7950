"""report.json (the contract other tools read, documented in docs/report.md) and report.md."""

from __future__ import annotations

import json
from pathlib import Path

from pbkd_mpi import atomic
from pbkd_mpi.errors import UserError
from pbkd_mpi.output.figures import draw_all
from pbkd_mpi.output.problems import Problems, attempt
from pbkd_mpi.schedule.whole_run import sequential_share


def write_report(run_dir: Path, report: dict, problems: Problems | None = None
                 ) -> tuple[Path, Path]:
    """report.json, then report.md. The pictures are drawn first, so that when one fails
    (recorded in `problems`, which `report["problems"]` lists) report.json says so."""
    figures = attempt(problems, "pictures", draw_all, report, run_dir) or {}
    json_path = Path(run_dir) / "report.json"
    atomic.write_text(json_path, json.dumps(report, indent=2) + "\n")
    return json_path, render_report(run_dir, report, figures)


BASELINES_FILE = "baselines.json"


def render_report(run_dir: Path, report: dict, figures: dict | None = None) -> Path:
    """report.md and its pictures (`figures` when drawn already), from the report dict
    and, where the `baselines` command measured this run, RUN/baselines.json (`report
    RUN_DIR` redraws)."""
    md_path = Path(run_dir) / "report.md"
    baselines = load_baselines(run_dir, report)
    if baselines is not None:
        report = {**report, "baselines": baselines}
    if figures is None:
        figures = draw_all(report, run_dir)
    atomic.write_text(md_path, render_markdown(report, figures))
    return md_path


def load_baselines(run_dir, report: dict) -> dict | None:
    """RUN/baselines.json when it was measured against this very run (a later run in the
    same directory makes it stale: its budget and student were another run's)."""
    try:
        baselines = json.loads((Path(run_dir) / BASELINES_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return baselines if baselines.get("run_wall_s") == report.get("wall_s") else None


def load_report(run_dir) -> dict:
    path = Path(run_dir) / "report.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{str(run_dir)!r} has no report.json: is it a finished run "
                        f"directory?") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{str(path)!r} is not valid JSON: {exc}.") from None


def compare(a: dict, b: dict) -> dict:
    """Figures of run B relative to run A (e.g. A with 1 worker, B with 4)."""
    def ratio(x, y):
        return x / y if x is not None and y else None

    energy_a, energy_b = a.get("energy", {}), b.get("energy", {})
    joules_a = _total_joules(energy_a)
    joules_b = _total_joules(energy_b)
    return {
        "runs": [a["run_dir"], b["run_dir"]],
        "workers": [a["workers"], b["workers"]],
        "distill_speedup": ratio(a["distill"]["makespan_s"], b["distill"]["makespan_s"]),
        "wall_speedup": ratio(a["wall_s"], b["wall_s"]),
        "energy_ratio": ratio(joules_b, joules_a),
        "accuracy_difference": b["student"]["accuracy_finetuned"]
        - a["student"]["accuracy_finetuned"],
        "teacher_accuracy_difference": b["teacher"]["accuracy"] - a["teacher"]["accuracy"],
        "student_params_ratio": ratio(b["student"]["params"], a["student"]["params"]),
        "phases": {name: [a["phases"].get(name), b["phases"].get(name)]
                   for name in dict.fromkeys([*a["phases"], *b["phases"]])},
    }


def _total_joules(energy: dict) -> float | None:
    values = [energy.get(key) for key in ("gpu_j", "cpu_j")]
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) if values else None


def render_comparison(c: dict) -> str:
    def fmt(value, spec=".2f", suffix=""):
        return "not measured" if value is None else f"{value:{spec}}{suffix}"

    lines = [
        f"A: {c['runs'][0]} ({c['workers'][0]} worker(s))",
        f"B: {c['runs'][1]} ({c['workers'][1]} worker(s))",
        f"distillation speedup B vs A: {fmt(c['distill_speedup'], '.2f', 'x')}",
        f"whole-run speedup B vs A:    {fmt(c['wall_speedup'], '.2f', 'x')}",
        f"energy B / A:                {fmt(c['energy_ratio'])}",
        f"student accuracy B - A:      {100 * c['accuracy_difference']:+.2f} points",
        f"student params B / A:        {fmt(c['student_params_ratio'])}",
        "phase seconds (A, B):",
    ]
    lines += [f"  {name:<10} {fmt(x, '.1f'):>10} {fmt(y, '.1f'):>10}"
              for name, (x, y) in c["phases"].items()]
    return "\n".join(lines)


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


def _deployment_rows(deployment: dict | None) -> list[str]:
    if not deployment:
        return []
    t, s = deployment["teacher"], deployment["student"]
    rows = []
    if t["file_bytes"] and s["file_bytes"]:
        rows.append(f"| saved model file | {t['file_bytes'] / 1e6:.2f} MB | "
                    f"{s['file_bytes'] / 1e6:.2f} MB | {s['file_bytes'] / t['file_bytes']:.2f} |")
    for row in deployment.get("latency", []):
        rows.append(f"| latency, batch {row['batch']} ({latency_label(row)}) | "
                    f"{row['teacher_ms']:.3g} ms | {row['student_ms']:.3g} ms | "
                    f"{row['ratio']:.2f} |")
    if deployment.get("latency_runtime"):
        rows.append(f"| latency measured with | {deployment['latency_runtime']}; medians, "
                    f"teacher and student interleaved | | |")
    return rows


def latency_label(row: dict) -> str:
    """One row of report.json's `deployment.latency` in words: runtime, device, threads."""
    threads = f", {row['threads']} thread{'s' if row['threads'] != 1 else ''}" if row[
        "threads"] else ""
    if row["runtime"] == "keras":
        return f"Keras, {row['device']}{threads}"
    return f"TFLite {row['runtime'].removeprefix('tflite-')}, XNNPACK{threads}"


def _energy_line(energy: dict | None) -> str:
    if not energy:
        return "Energy: not measured (no meter ran)."
    def joules(value):
        return "not measured" if value is None else f"{value:,.0f} J"
    return (f"Energy ({energy['method']}): GPU {joules(energy['gpu_j'])} "
            f"({energy['gpu_method']}), CPU package {joules(energy['cpu_j'])} "
            f"({energy['cpu_method']}); CPU time of all ranks {energy['cpu_s']:.1f} s. "
            f"Per rank and per phase in report.json (`energy`).")


def render_markdown(report: dict, figures: dict | None = None) -> str:
    lines = [*_summary_lines(report), *_warning_lines(report.get("warnings")),
             *_problem_lines(report.get("problems")),
             *_gate_lines(report.get("gate")), *_phase_lines(report), *_block_lines(report)]
    lines += _choice_lines(report.get("students"))
    lines += _acceptance_lines(report)
    lines += _chained_lines(report.get("chained"))
    lines += _baseline_lines(report)
    if report["failed_blocks"]:
        lines += ["", "## Failed blocks (kept the teacher's layers)", "",
                  "| block | attempts | last error (rank) |", "|---|---|---|"]
        lines += [f"| {f['name']} | {f['attempts']} | {f['errors'][-1]['error']} "
                  f"({f['errors'][-1]['rank']}) |" for f in report["failed_blocks"]]
    if figures:
        lines += ["", "## Pictures", ""]
        lines += [f"![{caption}]({name})\n\n*{caption}*\n" for name, caption in figures.items()]
    finetune = report["finetune"]
    lines += [
        "",
        "## Fine-tuning",
        "",
        f"{finetune['epochs']} epoch(s) run; validation accuracy {_pct(finetune['val_accuracy_before'])} "
        f"before and {_pct(finetune['val_accuracy'])} after (best epoch {finetune['best_epoch']}; "
        f"0 means the merged student was kept).",
        *_finetune_detail(finetune),
        "",
        f"Student model: `{report['student']['path']}`.",
        *_export_lines((report.get("deployment") or {}).get("exports")),
        "",
    ]
    return "\n".join(lines)


def _summary_lines(report: dict) -> list[str]:
    teacher, student, replaced = report["teacher"], report["student"], report["replaced"]
    return [
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
        *_deployment_rows(report.get("deployment")),
        "",
        "Accuracies are measured on the held-out test split; every selection (block early "
        "stopping, fine-tuning epochs) used the validation split.",
        "",
    ]


def _warning_lines(warnings: list | None) -> list[str]:
    return [line for warning in warnings or () for line in (f"**Warning:** {warning}", "")]


def _problem_lines(problems: list | None) -> list[str]:
    if not problems:
        return []
    return ["## Problems", "",
            "The student was made; these steps after it failed (the whole error of each is "
            "in `logs/rank-0.log`; docs/troubleshooting.md, exit code 4):", "",
            "| step | reason |", "|---|---|",
            *[f"| {p['step']} | {p['reason'].replace('|', '/')} |" for p in problems], ""]


def _gate_lines(gate: dict | None) -> list[str]:
    if not gate or not gate["bars"]:
        return []
    verdict = "passed" if gate["passed"] else "**failed** (the job exited 3)"
    return ["## Quality gate", "", f"The job's `[gate]` {verdict}.", "",
            "| bar | limit | measured | |", "|---|---|---|---|",
            *[f"| {bar['name']} | {bar['limit']:.4g} | {_measured(bar['value'])} | "
              f"{'passed' if bar['passed'] else '**missed**'} |" for bar in gate["bars"]],
            ""]


def _measured(value) -> str:
    return "not measured" if value is None else f"{value:.4g}"


def _phase_lines(report: dict) -> list[str]:
    return [
        "## Phases",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.1f} |" for name, seconds in report["phases"].items()),
        "",
        f"Distillation makespan {report['distill']['makespan_s']:.1f} s for "
        f"{report['distill']['sum_task_s']:.1f} s of block tasks "
        f"(sum / makespan = "
        f"{report['distill']['sum_task_s'] / max(report['distill']['makespan_s'], 1e-9):.2f}; "
        f"tasks that share a machine run slower, so the speedup over one worker is what "
        f"`report A B` measures) on {report['workers']} worker(s)"
        + (f"; lower bound {report['distill']['lower_bound_s']:.1f} s, efficiency "
           f"{_pct(report['distill']['efficiency'])} with the `{report['schedule']['policy']}` "
           f"schedule (profile: {report['schedule']['profile_method']})"
           if report.get("schedule") else "")
        + f"; the coordinator used "
        f"{_pct(report['distill']['coordinator_cpu_fraction'])} of a core while it waited. "
        f"{report['distill']['reused_blocks']} block(s) were reused from an earlier run in "
        f"this run directory and are not counted.",
        "",
        f"Sequential share after the teacher: "
        f"{_pct(sequential_share(report['phases'], report.get('chained')))} of the time "
        f"went to phases that more workers do not shorten in this version (blocks, profile, "
        f"what is left of acceptance after distillation, assemble, and the chained pass but "
        f"for its blocks trained at once), "
        f"which bounds the speedup of the whole run; `python -m pbkd_mpi simulate "
        f"RUN_DIR/profile.json --whole-run` projects every phase at other worker counts.",
        "",
        _energy_line(report.get("energy")),
        "",
        _memory_line(report.get("memory_budget"), report.get("energy")),
        "",
    ]


def _memory_line(budget: dict | None, energy: dict | None) -> str:
    peaks = [rank["peak_rss_mb"] for rank in (energy or {}).get("per_rank", [])]
    measured = (f"peak resident memory per rank {', '.join(f'{p:,.0f}' for p in peaks)} MB"
                if peaks else "peak resident memory not measured")
    if not budget:
        return f"Memory: {measured}."
    return (f"Memory: {measured}; estimated {budget['estimate_mb']:,} MB, budget "
            f"{budget['budget_mb']:,} MB per rank ({budget['source']}).")


def _block_lines(report: dict) -> list[str]:
    lines = [
        "## Blocks",
        "",
        "Relative MSE is the validation MSE divided by the variance of the teacher block's "
        "output: 1.0 would be no better than predicting its mean. `start` is the relative "
        "MSE of the student initialised from the teacher's factorised kernel, before training.",
        "",
        "| block | layers | in -> out | student (width) | rank | seconds | epochs | train MSE "
        "| val MSE | relative MSE (start) | params T -> S | FLOPs T -> S |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block in report["blocks"]:
        variance = block["target_variance"] or 1.0
        # Runs from before the family was recorded had only separable students.
        family = f"{block.get('family', 'separable')} ({block.get('width', '-')})"
        lines.append(
            f"| {block['name']} | {', '.join(block['layers'])} | "
            f"{'x'.join(map(str, block['input_shape']))} -> "
            f"{'x'.join(map(str, block['output_shape']))} | {family} | {block['rank']} | "
            f"{block['seconds']:.1f}{' (reused)' if block['reused'] else ''} | "
            f"{block['epochs']} | {block['train_mse']:.4g} | "
            f"{block['val_mse']:.4g} | {block['val_mse'] / variance:.3f} "
            f"({block['initial_val_mse'] / variance:.3f}) | "
            f"{_count(block['teacher_params'])} -> {_count(block['student_params'])} | "
            f"{_count(block['teacher_flops'])} -> {_count(block['student_flops'])} |"
        )
    return lines


def _acceptance_lines(report: dict) -> list[str]:
    """Each block's solo validation score and acceptance decision (distill/accept.py)."""
    accept = report.get("accept")
    if not accept:
        return []
    lines = ["", "## Acceptance", "",
             f"Each student block swapped alone into the teacher, scored on the validation "
             f"split (teacher: {_pct(accept['teacher_val_accuracy'])}); a block costing more "
             f"than {100 * accept['max_drop']:.1f} points is retrained once (its next "
             f"candidate student, else a wider one), then kept only if it passes.", "",
             "| block | alone (val) | drop | retry alone (val) | decision | student "
             "(last tried) |",
             "|---|---|---|---|---|---|"]
    for block in report["blocks"]:
        v = block.get("accept")
        if v is None:
            continue
        wider = "" if v["wider_solo_val_accuracy"] is None else _pct(v["wider_solo_val_accuracy"])
        lines.append(f"| {block['name']} | {_pct(v['solo_val_accuracy'])} | "
                     f"{100 * v['drop']:.1f} pts | {wider} | {v['decision']} | "
                     f"{v.get('family', 'separable')} w={v.get('width', '')} "
                     f"x{v['depth_multiplier']} |")
    return lines


def _choice_lines(students: dict | None) -> list[str]:
    """Each block's candidate students, the chosen first (model/choice.py)."""
    if not students or not students.get("blocks"):
        return []
    measures = next((list(c["latency_ms"]) for row in students["blocks"]
                     for c in row["candidates"] if "latency_ms" in c), [])
    timed = (f", each timed alone on {students['runtime']} (milliseconds at "
             f"{', '.join(f'`{m}`' for m in measures)}, then the geometric mean of its "
             f"times relative to the fastest candidate's; {students['seconds']:.1f} s in "
             f"all)" if measures else "")
    lines = ["", "## Student choice", "",
             f"Objective `{students['objective']}`{timed}. The chosen candidate first (* the "
             f"job's own `family` student): it was trained, or, the teacher's block, kept; a "
             f"block that failed acceptance was retrained with the published student, or "
             f"with a wider one when that went first.", "",
             "| block | budget (params) | candidates |", "|---|---|---|"]
    for row in students["blocks"]:
        cells = "; ".join(candidate_text(c) for c in row["candidates"])
        lines.append(f"| {row['name']} | {row['budget_params']} | {cells} |")
    return lines


def candidate_text(candidate: dict) -> str:
    """One candidate of report.json's `students`: `separable* w=16 x2, 864 params, 0.048 /
    3.1 ms x1.07` (family, width, depth multiplier, params, times at each batch, time
    relative to the block's fastest)."""
    text = ("teacher's block" if candidate["family"] == "teacher" else
            f"{candidate['family']}{'*' if candidate.get('published') else ''} "
            f"w={candidate['width']} x{candidate['depth_multiplier']}")
    text += f", {candidate['params']} params"
    if "latency_ms" in candidate:
        text += (", " + " / ".join(f"{ms:.3g}" for ms in candidate["latency_ms"].values())
                 + f" ms x{candidate['relative_time']:.2f}")
    return text


def describe_record(record: dict) -> list[str]:
    """The choice in lines of text, for `plan`: each block's candidates, the chosen first."""
    lines = [f"students: objective {record['objective']}"
             + (f", timed on {record['runtime']} at batches {record['batches']}"
                if record.get("runtime") else "")
             + (f" by {record['timed_on']}" if record.get("timed_on") else "")
             + " (* the `family` student)"]
    for row in record["blocks"]:
        parts = [candidate_text(c) for c in row["candidates"]]
        lines.append(f"  {row['name']}: " + (" > ".join(parts) if len(parts) > 1 else
                                             f"{parts[0]} (the only candidate)"))
    return lines


def _chained_lines(chained: dict | None) -> list[str]:
    """The chained pass: each block retrained on the student's own inputs."""
    if not chained or not chained.get("blocks"):
        return []
    order = ("all at once, each on the outputs of the parallel phase's student blocks "
             "before it" if chained.get("order", "sequential") == "parallel" else
             "one after another in the teacher's order, each on the outputs of the chained "
             "student blocks before it")
    lines = ["", "## Chained pass", "",
             f"Each replaced block trained up to {chained['epochs']} more epoch(s) on the "
             f"student's own inputs to it, {order} (the inputs it will see); the last with "
             "the teacher's head in its loss. Validation MSE on the student's inputs, "
             "before and after; new weights kept when the validation loss fell (with the "
             "head: when the student's validation accuracy rose). The inputs took "
             f"{chained.get('input_seconds', 0.0):.1f} s to compute.", "",
             "| block | val MSE before | after | val accuracy (head) | epochs | kept | s |",
             "|---|---|---|---|---|---|---|"]
    for row in chained["blocks"]:
        if row.get("skipped") or row.get("failed"):
            why = (f"skipped: {row['skipped']}" if row.get("skipped") else
                   "failed on every attempt: earlier weights kept")
            lines.append(f"| {row['name']} | {why} | | | | | |")
            continue
        accuracy = (f"{_pct(row['val_accuracy_before'])} -> {_pct(row['val_accuracy'])}"
                    if row.get("head_weight") else "")
        lines.append(f"| {row['name']} | {row['val_mse_before']:.4g} | {row['val_mse']:.4g} "
                     f"| {accuracy} | {row['epochs']} | {'yes' if row['kept'] else 'no'} "
                     f"| {row['seconds']:.1f} |")
    return lines


def _baseline_lines(report: dict) -> list[str]:
    """The `baselines` command's table: what the same wall time buys otherwise."""
    baselines = report.get("baselines")
    if not baselines:
        return []
    budget = ("given with --budget-s" if baselines["budget_given"] else
              "this run's wall time after the teacher")
    student = report["student"]
    lines = ["", "## What it buys", "",
             f"The student's graph with fresh weights, trained on one process for the "
             f"same wall time ({baselines['method_s']:.0f} s, {budget}) or a multiple: "
             f"whole-model KD (keras.distillation, the teacher running live, T and alpha "
             f"of this run) and plain training on labels; Adam "
             f"{baselines['learning_rate']:g}, cosine over the epochs that fit, the best "
             f"validation epoch kept. Peak RSS {baselines['peak_rss_mb']:,} MB.", "",
             "| method | wall time | epochs | val | test |", "|---|---|---|---|---|",
             f"| pbkd_mpi (this run) | {baselines['method_s']:.0f} s | | "
             f"{_pct(student['val_accuracy_finetuned'])} | "
             f"{_pct(student['accuracy_finetuned'])} |"]
    names = {"kd": "whole-model KD", "scratch": "from scratch on labels"}
    stuck = []
    for row in baselines["results"]:
        flag = " (at chance)" if row.get("at_chance") else ""
        lines.append(f"| {names[row['method']]}, x{row['factor']:g}{flag} | "
                     f"{row['used_s']:.0f} s | {row['epochs']} | {_pct(row['val_accuracy'])} | "
                     f"{_pct(row['test_accuracy'])} |")
        if row.get("at_chance"):
            stuck.append(f"**Warning:** {names[row['method']]} x{row['factor']:g} stayed at "
                         f"chance: best validation accuracy {_pct(row['val_accuracy'])}, "
                         f"test {_pct(row['test_accuracy'])} after {row['epochs']} "
                         f"epoch(s), chance {_pct(row['chance'])} (at or "
                         f"below {_pct(row['chance_bound'])} counts as chance). It did not "
                         f"learn in its budget: the difference to it is that baseline's "
                         f"handicap, not the method's gain.")
    for warning in stuck:
        lines += ["", warning]
    return lines


def _finetune_detail(finetune: dict) -> list[str]:
    lines = []
    if "ranks" in finetune:
        lines += ["", f"Data-parallel on {finetune['ranks']} rank(s), loss `{finetune['loss']}`; "
                  f"weights identical on every rank at the end: "
                  f"{'yes' if finetune.get('identical_weights', True) else 'NO'}."]
    for r in finetune.get("recoveries", []):
        lines += ["", f"Divergence guard at epoch {r['epoch']} ({r['reason']}): weights of "
                  f"epoch {r['restored_epoch']} restored, learning rate x"
                  f"{r['learning_rate_scale']:.3g}."]
    return lines


def _export_lines(exports: dict | None) -> list[str]:
    if not exports:
        return []
    lines = ["", "| export | size | largest output difference | class agreement |",
             "|---|---|---|---|"]
    for name, e in exports.items():
        select = " (needs TF Select ops)" if e.get("ops") == "builtins+select_tf" else ""
        lines.append(f"| {name} (`{e['path']}`){select} | {_count(e['bytes'])} B | "
                     f"{e['max_abs_diff']:.2g} | {_pct(e['class_agreement'])} |")
    return lines
