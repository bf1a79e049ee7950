"""Projected makespans of every policy at every worker count, from a run's profile (pure).

`python -m pbkd_mpi simulate RUN_DIR/profile.json` prints this table; the benchmarks use
it to compare policies on profiles measured elsewhere.
"""

from __future__ import annotations

from pbkd_mpi.schedule.estimates import task_estimates
from pbkd_mpi.schedule.planner import lower_bound, make_plan
from pbkd_mpi.schedule.simulate import simulate_plan


# The rows of a simulation: the three policies, and work-stealing with splitting.
VARIANTS = (("round-robin", False), ("static-lpt", False), ("work-stealing", False),
            ("work-stealing", True))


def variant_name(policy: str, split: bool) -> str:
    return f"{policy}+split" if split else policy


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
