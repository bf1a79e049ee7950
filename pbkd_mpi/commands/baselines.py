"""`python -m pbkd_mpi baselines RUN [--budget-factor 1,2]`: the finished run's student
against whole-model KD and from-scratch training given the same wall time.

One process. The budget is the run's own time after the teacher (finetune/baselines.
method_seconds) times each factor, or `--budget-s`. The teacher, the data and the student
graph are the run's (checked against its report); the graph trained is the trainable
assembled student (report.json `student.assembled_path`, RUN/student-assembled.keras),
never the deployed `student.keras`. The results go to RUN/baselines.json, report.md gets a
section and a time-to-accuracy picture, a baseline that stayed at chance is named in a
warning, and the last line printed is one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pbkd_mpi import atomic, memory_budget
from pbkd_mpi.config import load_job
from pbkd_mpi.data.dataset import load_dataset
from pbkd_mpi.errors import EXIT_OK, UserError
from pbkd_mpi.finetune.baselines import (METHODS, chance_warning, method_seconds,
                                         run_baseline)
from pbkd_mpi.keys import model_fingerprint
from pbkd_mpi.model.graph import flatten_model
from pbkd_mpi.model.teacher import load_model_file
from pbkd_mpi.output.memory import PeakMemory
from pbkd_mpi.output.report import BASELINES_FILE, load_report, render_report
from pbkd_mpi.run_dir import JOB_FILE


def parse_factors(text: str) -> list[float]:
    try:
        factors = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        factors = []
    if not factors or any(f <= 0 for f in factors):
        raise UserError(f"--budget-factor takes positive numbers separated by commas, "
                        f"e.g. 1,2; received {text!r}.")
    return factors


def baselines_command(args) -> int:
    run_dir = Path(args.run)
    report = load_report(run_dir)
    factors = parse_factors(args.budget_factor)
    run_s = args.budget_s if args.budget_s is not None else method_seconds(report)
    job_file = run_dir / JOB_FILE
    if not job_file.is_file():
        raise UserError(f"{str(run_dir)!r} has no {JOB_FILE}: is it a finished run directory?")
    job = load_job(job_file)
    student_file = trainable_student_file(run_dir, report)
    peak = PeakMemory()
    dataset = load_dataset(job.data, job.run.seed)
    _check_same_data(dataset, report)
    memory_budget.require_fits(memory_budget.estimate(job, dataset, None, 1), 1)
    teacher = _run_teacher(run_dir, report, job)
    student_graph = load_model_file(str(student_file))
    config = job.finetune
    results = []
    for factor in factors:
        for method in METHODS:
            results.append({"factor": factor, **run_baseline(
                method, teacher, student_graph, dataset, run_s * factor,
                batch_size=config.batch_size, rate=args.learning_rate,
                temperature=config.temperature, alpha=config.alpha, seed=job.run.seed,
                label=f"{method} x{factor:g}")})
    baselines = {"run_wall_s": report["wall_s"], "method_s": run_s,
                 "budget_given": args.budget_s is not None, "learning_rate": args.learning_rate,
                 "peak_rss_mb": round(peak.peak() / 2**20), "results": results}
    atomic.write_text(run_dir / BASELINES_FILE, json.dumps(baselines, indent=2) + "\n")
    print(f"report: {render_report(run_dir, report)}")
    for row in results:
        if row["at_chance"]:
            print(f"warning: {chance_warning(row, _label(row))}", file=sys.stderr, flush=True)
    print(json.dumps(summary(report, baselines)))
    return EXIT_OK


ASSEMBLED_FILE = "student-assembled.keras"
_NAMES = {"kd": "whole-model KD", "scratch": "from scratch on labels"}


def _label(row: dict) -> str:
    return f"{_NAMES.get(row['method'], row['method'])} x{row['factor']:g}"


def trainable_student_file(run_dir: Path, report: dict) -> Path:
    """The run's trainable student graph: the assembled student (its BNs, and the teacher's
    training-only layers such as Dropout), which report.json names `student.assembled_path`
    (found in the run directory where it is now), else RUN/student-assembled.keras. Not
    student.keras: deployed, its BNs folded into the convs, it trains poorly from scratch."""
    named = (report.get("student") or {}).get("assembled_path")
    path = Path(_in_run_dir(run_dir, named)) if named else run_dir / ASSEMBLED_FILE
    if not path.is_file():
        raise UserError(f"the baselines train the run's assembled student graph, expected at "
                        f"{str(path)!r}, which `run` writes; it is not there. Run the "
                        f"job again in this directory (it reuses the finished work; then "
                        f"give the first run's time with --budget-s).")
    return path


def summary(report: dict, baselines: dict) -> dict:
    """The figures of the first budget factor, and every factor's under `by_factor`.
    `margin` is the run's test accuracy minus the best baseline that learned; a baseline
    at chance is listed under `at_chance` and left out of it (null when every one is)."""
    pbkd = report["student"]["accuracy_finetuned"]
    by_factor = {}
    for row in baselines["results"]:
        entry = by_factor.setdefault(f"{row['factor']:g}", {
            "budget_s": row["budget_s"], "pbkd_test": pbkd, "at_chance": []})
        entry[f"{row['method']}_test"] = row["test_accuracy"]
        if row.get("at_chance"):
            entry["at_chance"].append(row["method"])
    for entry in by_factor.values():
        learned = [entry[f"{m}_test"] for m in METHODS
                   if f"{m}_test" in entry and m not in entry["at_chance"]]
        entry["margin"] = pbkd - max(learned) if learned else None
    first = next(iter(by_factor.values()))
    return {**first, "by_factor": by_factor}


def _check_same_data(dataset, report: dict) -> None:
    made = {k: report["data"].get(k) for k in ("train", "val", "test", "num_classes")}
    found = {k: dataset.summary()[k] for k in made}
    if made != found:
        raise UserError(f"the job's data no longer match the run: the run had {made}, the "
                        f"job's data give {found}.")


def _in_run_dir(run_dir: Path, path: str) -> str:
    """A file the run wrote, in the run directory where it is now (it may have moved)."""
    here = run_dir / Path(path).name
    return str(here) if here.is_file() else path


def _run_teacher(run_dir: Path, report: dict, job):
    """The run's teacher, the same one it distilled (its fingerprint)."""
    source = report["teacher"].get("file")
    source = _in_run_dir(run_dir, source) if source else job.teacher.source
    teacher = load_model_file(source)
    if model_fingerprint(flatten_model(teacher)) != report["teacher"]["fingerprint"]:
        raise UserError(f"the teacher {source!r} is not the one the run distilled (its "
                        f"weights or graph changed since).")
    return teacher
