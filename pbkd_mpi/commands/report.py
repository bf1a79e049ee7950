"""`python -m pbkd_mpi report RUN [RUN_B]`: redraw a run's report, or compare two runs."""

from __future__ import annotations

import json

from pbkd_mpi.errors import EXIT_OK, UserError
from pbkd_mpi.output.report import compare, load_report, render_comparison, render_report


def report_command(args) -> int:
    if len(args.runs) == 1:
        path = render_report(args.runs[0], load_report(args.runs[0]))
        print(f"report: {path}")
    elif len(args.runs) == 2:
        comparison = compare(load_report(args.runs[0]), load_report(args.runs[1]))
        print(json.dumps(comparison, indent=2) if args.json else render_comparison(comparison))
    else:
        raise UserError(f"report takes one run directory (redraw) or two (compare), "
                        f"received {len(args.runs)}.")
    return EXIT_OK
