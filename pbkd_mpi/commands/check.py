"""`python -m pbkd_mpi check RUN [--set gate.KEY=VALUE ...]`: a quality gate on a finished
run, without training: the run's own `[gate]` (RUN/job.toml) with the overrides applied,
checked against RUN/report.json. Exit 0 when every bar holds, 3 when one is missed, 4 when
every bar holds but a step after the student failed (report `problems`) and the gate does
not allow it (`gate.allow_problems`)."""

from __future__ import annotations

import json
from pathlib import Path

from pbkd_mpi.config import load_job
from pbkd_mpi.errors import UserError
from pbkd_mpi.gate import check_gate, exit_code
from pbkd_mpi.output.report import load_report
from pbkd_mpi.run_dir import JOB_FILE


def check_command(args) -> int:
    wrong = [item for item in args.set if not item.strip().startswith("gate.")]
    if wrong:
        raise UserError(f"check takes only gate keys (--set gate.KEY=VALUE), received "
                        f"{', '.join(wrong)}.")
    report = load_report(args.run)
    job_file = Path(args.run) / JOB_FILE
    job = load_job(job_file if job_file.is_file() else None, args.set)
    verdict = check_gate(job.gate, report)
    if args.json:
        print(json.dumps(verdict, indent=2))
    elif not verdict["bars"]:
        print("no bar set: give the run's job a [gate] section or --set gate.KEY=VALUE")
    else:
        for bar in verdict["bars"]:
            value = "not measured" if bar["value"] is None else f"{bar['value']:.4g}"
            print(f"{'passed' if bar['passed'] else 'MISSED':<7} {bar['name']}: "
                  f"{value} (limit {bar['limit']:.4g})")
    for problem in report.get("problems", []):
        print(f"problem: {problem['step']} failed: {problem['reason']}")
    return exit_code(job.gate, report)
