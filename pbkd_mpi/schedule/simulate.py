"""Predicted makespans: the coordinator's own Scheduler driven by a virtual clock (pure).

`simulate_plan` runs a plan's Scheduler with each task taking its estimated seconds (or
given actual seconds, or slower on some workers) and no hand-out latency, so the result is
what the policy itself achieves. `simulate_profile` does that for every policy and worker
count of a profile.json; `python -m pbkd_mpi simulate RUN_DIR/profile.json` prints it.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass

from pbkd_mpi.schedule.planner import Scheduler, lower_bound, make_plan

# The rows of a simulation: the three policies, and work-stealing with splitting.
VARIANTS = (("round-robin", False), ("static-lpt", False), ("work-stealing", False),
            ("work-stealing", True))


def variant_name(policy: str, split: bool) -> str:
    return f"{policy}+split" if split else policy


@dataclass(frozen=True)
class Simulated:
    makespan_s: float
    tasks: tuple  # (name, workers, start_s, end_s) in order of ending


def simulate_plan(plan, actual: dict | None = None, slowness: dict | None = None) -> Simulated:
    """Run `plan` on a virtual clock. `actual[name]`: the task's true seconds at its planned
    ways (default: the plan's estimates); `slowness[worker]`: a factor on every task that
    worker takes part in (a gang runs at its slowest member's pace)."""
    actual = plan.estimates if actual is None else actual
    slowness = slowness or {}
    scheduler = Scheduler(plan)
    idle, now, sequence = set(plan.workers), 0.0, 0
    running, finished = [], []
    while True:
        for name, workers in scheduler.assign(idle, plan.workers):
            seconds = actual[name] * max(slowness.get(w, 1.0) for w in workers)
            idle -= set(workers)
            heapq.heappush(running, (now + seconds, sequence, name, workers, now))
            sequence += 1
        if not running:
            break
        end, _, name, workers, start = heapq.heappop(running)
        now = end
        idle |= set(workers)
        scheduler.done(name, workers, end - start)
        finished.append((name, workers, start, end))
    if not scheduler.empty():
        raise ValueError(f"plan cannot finish: tasks left {scheduler.gangs} need more workers "
                         f"than the {len(plan.workers)} there are")
    return Simulated(max((t[3] for t in finished), default=0.0), tuple(finished))


def simulate_estimates(estimates_for, workers_list, variants=VARIANTS) -> dict:
    """{workers: {variant: {makespan_s, lower_bound_s, ratio}}}. `estimates_for(w)`: the
    TaskEstimates for w workers (split times depend on how many there are). Every variant
    is measured against the same bound, the one with splitting allowed, so the ratios say
    how far each is from the best any schedule could do."""
    table = {}
    for workers in workers_list:
        tasks = estimates_for(workers)
        bound = lower_bound(tasks, workers, split=True)
        bound_unsplit = lower_bound(tasks, workers, split=False)
        rows = {}
        for policy, split in variants:
            plan = make_plan(tasks, workers, policy, split)
            makespan = simulate_plan(plan).makespan_s
            split_tasks = {n: k for n, k in plan.ways.items() if k > 1}
            rows[variant_name(policy, split)] = {
                "makespan_s": makespan, "lower_bound_s": bound,
                "ratio": makespan / bound if bound > 0 else 1.0,
                **({"split": split_tasks} if split else {}),
            }
        table[workers] = {"lower_bound_s": bound, "lower_bound_unsplit_s": bound_unsplit,
                          "policies": rows}
    return table


def simulate_profile(profile: dict, workers_list) -> dict:
    from pbkd_mpi.schedule.profile import task_estimates

    return simulate_estimates(lambda w: task_estimates(profile, w), workers_list)


def render_table(table: dict, title: str = "") -> str:
    names = [variant_name(p, s) for p, s in VARIANTS]
    lines = [title] if title else []
    lines.append(f"{'workers':>7}  {'lower bound s':>13}  " +
                 "  ".join(f"{n:>26}" for n in names))
    for workers, row in table.items():
        cells = [f"{row['policies'][n]['makespan_s']:>10.1f} s ({row['policies'][n]['ratio']:.3f}x)"
                 for n in names]
        lines.append(f"{workers:>7}  {row['lower_bound_s']:>13.1f}  " +
                     "  ".join(f"{c:>26}" for c in cells))
    lines.append("Each cell: predicted makespan (ratio to the lower bound with splitting "
                 "allowed: least work / workers, the longest task's shortest time and the "
                 "per-worker packing limits, schedule.lower_bound).")
    return "\n".join(lines)


def simulate_command(args) -> int:
    from pbkd_mpi.errors import UserError
    from pbkd_mpi.schedule.profile import load_profile

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


