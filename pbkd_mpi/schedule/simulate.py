"""Predicted makespans: the coordinator's own Scheduler driven by a virtual clock (pure).

`simulate_plan` runs a plan's Scheduler with each task taking its estimated seconds (or
given actual seconds, or slower on some workers) and no hand-out latency, so the result is
what the policy itself achieves (projection.py does that for every policy and worker count).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pbkd_mpi.schedule.scheduler import Scheduler


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
