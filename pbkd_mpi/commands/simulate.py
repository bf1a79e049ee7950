"""`python -m pbkd_mpi simulate PROFILE`: every policy's predicted makespan, no training."""

from __future__ import annotations

import json

from pbkd_mpi.errors import UserError
from pbkd_mpi.schedule.estimates import load_profile
from pbkd_mpi.schedule.projection import render_table, simulate_profile


def simulate_command(args) -> int:
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        raise UserError(f"--workers expects comma-separated worker counts such as 1,2,4, "
                        f"received {args.workers!r}.") from None
    if not workers or min(workers) < 1:
        raise UserError(f"--workers expects positive worker counts, received {args.workers!r}.")
    profile = load_profile(args.profile)
    table = simulate_profile(profile, workers)
    if args.json:
        print(json.dumps({"profile": str(args.profile), "method": profile.get("method"),
                          "workers": table}, indent=2))
    else:
        print(render_table(table, f"{args.profile} ({profile.get('method')}, "
                                  f"{len(profile['blocks'])} block tasks)"))
    return 0


