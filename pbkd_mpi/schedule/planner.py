"""Which worker trains which block when: policies, splitting, the lower bound (pure).

A task's cost is a `TaskEstimate`: its seconds on 1, 2, ... k workers (k > 1: trained
data-parallel on disjoint shards, see profile.split_seconds). A `Plan` fixes, before the
run, the policy, how many workers each task gets (`ways`) and each worker's initial queue.
A `Scheduler` then answers, as workers become idle, which task each of them runs next; the
coordinator (mpi/protocol.py) and the simulator (simulate.py) drive the same Scheduler, so what
the simulator predicts is what the coordinator does.

Policies:
- `round-robin`: task i (in the teacher's order) to worker i mod W, fixed: the paper's default.
- `static-lpt`: longest task first onto the least-loaded worker, fixed before the run.
- `work-stealing`: queues seeded by LPT; a worker whose queue is empty takes the longest
  task left in the most loaded queue (load = estimated seconds x that worker's measured
  slowness), and measured task times correct the estimates as the run goes. With
  splitting, tasks longer than the ideal makespan run on k workers at once ("gangs", on
  the workers the plan names, in the same place of each member's queue: packing.py).

docs/scheduling.md gives the lower bound's argument and how close the plans come to it.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import numpy as np

from pbkd_mpi.errors import UserError
from pbkd_mpi.schedule.packing import pack
from pbkd_mpi.schedule.scheduler import Plan, TaskEstimate
from pbkd_mpi.schedule.simulate import simulate_plan

POLICIES = ("round-robin", "static-lpt", "work-stealing")
LOCAL_SEARCH_ROUNDS = 64  # enough to move several tasks several workers; each round is cheap
LOCAL_SEARCH_STARTS = 4


# Per-worker packing limits the bound uses: on one worker, pieces longer than T / (m + 1)
# number at most m when everything on it ends by T (m + 1 of them would exceed T).
PACKING_LEVELS = (1, 2, 3)


def _options(task: TaskEstimate, workers: int, split: bool) -> list[tuple[int, float]]:
    """(k, seconds on k) for each way `task` may run."""
    most = task.max_ways(workers) if split else 1
    return [(k, task.on(k)) for k in range(1, most + 1)]


def _least_packed_work(options, limit: float, level: int, workers: int,
                       shortest: float) -> float:
    """The least worker-seconds of every task done within `limit`, each on one of its
    `options` (per task: [(k, seconds)]), where the pieces longer than limit / (level + 1)
    take at most level x workers worker slots in all (k slots for a task on k workers),
    and (level 1) a piece too long to leave room for the `shortest` piece of any task
    beside it also counts the time its workers then stay idle (see `lower_bound`). inf:
    no choice does. A knapsack over the slots used."""
    slots = level * workers
    least = np.full(slots + 1, math.inf)
    least[0] = 0.0
    for choices in options:
        fits = [(k, seconds) for k, seconds in choices if seconds <= limit]
        if not fits:
            return math.inf
        # A short piece uses no slot: only the least work of those matters.
        short = [k * s for k, s in fits if s * (level + 1) <= limit]
        best = least + min(short) if short else np.full(slots + 1, math.inf)
        for k, seconds in fits:
            if seconds * (level + 1) > limit and k <= slots:
                idle = limit - seconds if level == 1 and limit - seconds < shortest else 0.0
                best[k:] = np.minimum(best[k:], least[:-k] + k * (seconds + idle))
        least = best
    return float(least.min())


def _packing_bound(options, workers: int, level: int) -> float:
    """The least T at which `_least_packed_work` at `level` fits in workers x T.

    Feasibility only grows with T: a choice that fits at T fits beyond it, counts as long
    no more, and its idle time grows by at most (T' - T) on each of at most `workers`
    slots (a piece that leaves no room for another is the only one on its worker, so
    longer than T / 2, one of the level-1 slots). Which choices fit, count as long or
    leave no room only changes where T passes a task's seconds s on some k, (level + 1) s
    or s + the shortest piece: the first such point P_i that is feasible is found by
    bisection, then the least T in [P_(i-1), P_i): max(P_(i-1), least work there / W)
    when that is feasible (always, without idle time), else by bisection from there,
    keeping the infeasible end (never above the true least T)."""
    shortest = min(s for choices in options for _, s in choices)
    points = sorted({s + f for choices in options for _, s in choices
                     for f in (0.0, level * s, *((shortest,) if level == 1 else ()))})
    # Everything alone on one worker, one after another, is always feasible: the last point.
    total = sum(choices[0][1] for choices in options)
    points = [p for p in points if p < total] + [total]

    def work(limit):
        return _least_packed_work(options, limit, level, workers, shortest)

    def feasible(limit):
        return work(limit) <= workers * limit

    low, high = 0, len(points) - 1
    while low < high:
        middle = (low + high) // 2
        if feasible(points[middle]):
            high = middle
        else:
            low = middle + 1
    if low == 0:
        return points[0]
    start, end = points[low - 1], points[low]
    below = max(start, work(start) / workers)  # the least work only grows inside
    if below >= end:
        return end
    if feasible(below):
        return below
    for _ in range(60):  # far below any time a profile resolves
        middle = (below + end) / 2
        if feasible(middle):
            end = middle
        else:
            below = middle
    return below


def lower_bound(tasks, workers: int, split: bool) -> float:
    """No schedule of these tasks on `workers` finishes sooner (each task on one worker,
    or with `split` on k workers at once for its time on k, as gangs run).

    Take any schedule with makespan T. Each task runs on some k workers, for its time on
    k, at most T, and costs k times that in worker-seconds; the work of all tasks fits in
    workers x T. On any one worker the pieces it runs add up to at most T, so for any m
    at most m of them last longer than T / (m + 1); a task on k workers is a piece on
    each of them, so the tasks longer than T / (m + 1) use at most m x workers worker
    slots in all, k each. And a piece that leaves its workers less than the shortest
    piece of any task (T minus its length below that) is alone on them: its workers'
    idle time counts as work (a worker-second of it cannot run anything). The bound is,
    for m = 1, 2, 3, the least T for which some choice of k per task meets all of that
    (the idle time with m = 1), and the largest of the three. It is never below
    max(total / workers, longest task) (without splitting) or the least work over
    workers and the longest task's shortest time (with it); it is above them when tasks
    pack badly (say, three tasks of 2 s on two workers: 4 s, not 3 s), and splitting
    that costs overhead raises it, as it must. Tested against the brute-force optimum of
    small task sets (tests/test_schedule.py)."""
    if workers < 1:
        raise ValueError(f"expected at least 1 worker, received {workers}")
    if not tasks:
        return 0.0
    options = [_options(t, workers, split) for t in tasks]
    return max(_packing_bound(options, workers, level) for level in PACKING_LEVELS)


def make_plan(tasks, workers, policy: str = "work-stealing", split: bool = False,
              ways: dict | None = None) -> Plan:
    """The plan of `tasks` (TaskEstimate, in the teacher's order) on `workers` (a count or
    the worker ids). `ways` fixes the split of each task; by default the planner chooses
    it (work-stealing with `split` only; the published baselines never split)."""
    ids = tuple(range(1, workers + 1)) if isinstance(workers, int) else tuple(workers)
    if policy not in POLICIES:
        raise ValueError(f"expected a policy among {', '.join(POLICIES)}, received {policy!r}")
    if not ids:
        raise ValueError("expected at least one worker, received none")
    tasks = list(tasks)
    if ways is None:
        if split and policy == "work-stealing" and len(ids) > 1:
            return _best_split_plan(tasks, ids)
        ways = {t.name: 1 for t in tasks}
    return _plan_with_ways(tasks, ids, policy, ways, lower_bound(tasks, len(ids), split))


def forced_ways(ways: dict, rules, tasks, workers) -> dict:
    """`ways` with the job's `"pattern=k"` rules applied (schedule.split_blocks; the first
    matching rule wins). `workers`: the task workers' ids (or their count). A rule the
    tasks cannot follow is refused, saying why."""
    ids = tuple(range(1, workers + 1)) if isinstance(workers, int) else tuple(workers)
    workers = len(gang_workers(ids))  # rank 0's training thread never joins a split task
    by_name = {t.name: t for t in tasks}
    out = dict(ways)
    for name in out:
        for rule in rules:
            pattern, _, k = rule.partition("=")
            if fnmatchcase(name, pattern.strip()):
                k = int(k)
                if k > by_name[name].max_ways(workers):
                    raise UserError(
                        f"schedule.split_blocks asks for block {name!r} on {k} workers; it can "
                        f"run on at most {by_name[name].max_ways(workers)} here ({workers} "
                        f"worker rank(s) can join a split task; splitting needs a measured "
                        f"profile with 2 or more workers and schedule.split = true).")
                out[name] = k
                break
    return out


def gang_workers(ids) -> tuple:
    """The workers that can train a split task: not rank 0's own training thread, which
    has no MPI communicator of its own to join one with."""
    return tuple(w for w in ids if w != 0)


def _plan_with_ways(tasks, ids, policy, ways, bound: float) -> Plan:
    """The plan for fixed `ways`; `bound`: the tasks' lower bound on these workers, which
    does not depend on the ways (so a search over ways computes it once)."""
    by_name = {t.name: t for t in tasks}
    capacity = len(gang_workers(ids))
    for name, k in ways.items():
        if not 1 <= k <= max(1, by_name[name].max_ways(capacity)):
            raise ValueError(f"task {name!r} cannot run on {k} workers: it has estimates for "
                             f"1..{len(by_name[name].seconds)} and {capacity} workers can "
                             f"train a split task")
    estimates = {t.name: t.on(ways[t.name]) for t in tasks}
    order = tuple(sorted(estimates, key=lambda n: (-estimates[n], n)))
    packing = pack([t.name for t in tasks], estimates, ways, ids, gang_workers(ids), policy)
    return Plan(policy, ids, dict(ways), packing.queues, estimates, order, bound,
                gangs=packing.gangs)


def _best_split_plan(tasks, ids) -> Plan:
    """Splitting chosen by simulation: for several targets T (from the ideal makespan
    total / W down, and from the lower bound up), every task longer than T runs on the
    fewest workers that bring it under T; also the allotment that gives one more worker to the longest task until the
    workers run out (best when there are more workers than tasks). The candidate whose
    simulated makespan is shortest wins; no split at all is a candidate too."""
    workers = len(gang_workers(ids))  # the most workers one split task can have
    ideal = sum(t.alone for t in tasks) / workers
    bound = lower_bound(tasks, workers, split=True)
    candidates = [{t.name: 1 for t in tasks}]
    targets = [ideal * f for f in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)]
    # Around the bound: each task on the fewest workers that bring it under the target,
    # which is the least work when splitting only adds overhead.
    targets += [bound * f for f in (1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5)]
    for target in targets:
        ways = {}
        for t in tasks:
            k = 1
            while t.on(k) > target and k < t.max_ways(workers):
                k += 1
            ways[t.name] = k
        if ways not in candidates:
            candidates.append(ways)
    if len(tasks) <= workers:
        ways = {t.name: 1 for t in tasks}
        while sum(ways.values()) < workers:
            growable = [t for t in tasks if ways[t.name] < t.max_ways(workers)
                        and t.on(ways[t.name] + 1) < t.on(ways[t.name])]
            if not growable:
                break
            longest = max(growable, key=lambda t: t.on(ways[t.name]))
            ways[longest.name] += 1
        candidates.append(ways)
    plan_bound = lower_bound(tasks, len(ids), split=True)

    def simulated(ways):
        plan = _plan_with_ways(tasks, ids, "work-stealing", ways, plan_bound)
        return simulate_plan(plan).makespan_s, plan

    ranked = sorted((simulated(ways) for ways in candidates), key=lambda pair: pair[0])
    # Then local search from the best few: one task's workers one up or down, the best
    # such move while it shortens the simulated makespan (each simulation takes
    # milliseconds; greedy search from one start alone stalls in local minima).
    by_name = {t.name: t for t in tasks}
    best = ranked[0]
    for start in ranked[:LOCAL_SEARCH_STARTS]:
        current = start
        for _ in range(LOCAL_SEARCH_ROUNDS):
            ways = current[1].ways
            moves = [{**ways, name: k + step} for name, k in ways.items() for step in (1, -1)
                     if 1 <= k + step <= by_name[name].max_ways(workers)]
            trial = min((simulated(m) for m in moves), key=lambda pair: pair[0], default=None)
            if trial is None or trial[0] >= current[0] * (1 - 1e-9):
                break
            current = trial
        if current[0] < best[0]:
            best = current
    makespan, plan = best
    return Plan(**{**plan.__dict__, "predicted_s": makespan})
