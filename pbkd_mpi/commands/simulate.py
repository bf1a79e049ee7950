"""`python -m pbkd_mpi simulate PROFILE`: every policy's predicted makespan, no training."""

from __future__ import annotations

import json
from pathlib import Path

from pbkd_mpi.errors import UserError
from pbkd_mpi.schedule.estimates import load_profile
from pbkd_mpi.schedule.projection import render_table, simulate_profile
from pbkd_mpi.schedule.whole_run import project_run, render_projection


def simulate_command(args) -> int:
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        raise UserError(f"--workers expects comma-separated worker counts such as 1,2,4, "
                        f"received {args.workers!r}.") from None
    if not workers or min(workers) < 1:
        raise UserError(f"--workers expects positive worker counts, received {args.workers!r}.")
    profile = load_profile(args.profile)
    if getattr(args, "whole_run", False):
        return _whole_run(args, profile, workers)
    table = simulate_profile(profile, workers)
    if args.json:
        print(json.dumps({"profile": str(args.profile), "method": profile.get("method"),
                          "workers": table}, indent=2))
    else:
        print(render_table(table, f"{args.profile} ({profile.get('method')}, "
                                  f"{len(profile['blocks'])} block tasks)"))
    return 0


def _whole_run(args, profile: dict, workers: list) -> int:
    """Every phase after the teacher projected from the run that wrote the profile."""
    report_path = Path(args.phases) if args.phases else Path(args.profile).parent / "report.json"
    if not report_path.is_file():
        raise UserError(
            f"--whole-run needs the measured phases of a run: expected {str(report_path)!r} "
            f"(a run directory's report.json beside its profile.json), or --phases REPORT.")
    report = json.loads(report_path.read_text())
    if "phases" not in report or "workers" not in report:
        raise UserError(f"{str(report_path)!r} is not a run's report.json: it has no "
                        f"'phases' and 'workers'.")

    def makespan_for(count: int) -> float:
        rows = simulate_profile(profile, [count])[count]["policies"]
        return rows["work-stealing+split"]["makespan_s"]

    # Rank 0 computed when more ranks fine-tuned than there were workers (before c475d39
    # it always did; reports then did not say so otherwise).
    measured = int(report["workers"])
    rank0_computed = report.get("finetune", {}).get("ranks", measured) > measured
    table = project_run(report["phases"], measured, makespan_for, workers,
                        report.get("chained"), rank0_computed)
    if args.json:
        print(json.dumps({"profile": str(args.profile), "phases_from": str(report_path),
                          "whole_run": table}, indent=2))
    else:
        print(render_projection(table, f"{args.profile}, phases of {report_path} "
                                       f"({report['workers']} workers measured)"))
    return 0
