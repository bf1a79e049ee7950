"""The live state of a plan: which task each idle worker runs next (pure).

The coordinator (mpi/protocol.py) and the simulator (simulate.py) drive the same
Scheduler, so what the simulator predicts is what the coordinator does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskEstimate:
    """`seconds[k - 1]`: the task's estimated time on k workers; one entry: not splittable."""

    name: str
    seconds: tuple[float, ...]

    def __post_init__(self):
        if not self.seconds or any(not (s >= 0 and math.isfinite(s)) for s in self.seconds):
            raise ValueError(f"task {self.name!r}: expected finite non-negative seconds on "
                             f"1..k workers, received {self.seconds!r}")

    @property
    def alone(self) -> float:
        return self.seconds[0]

    def on(self, ways: int) -> float:
        return self.seconds[ways - 1]

    def max_ways(self, workers: int) -> int:
        return min(workers, len(self.seconds))


@dataclass(frozen=True)
class Plan:
    policy: str
    workers: tuple[int, ...]  # worker ids (MPI ranks in a run, 1..W in a simulation)
    ways: dict  # task name -> workers that train it together (1: not split)
    queues: dict  # worker id -> initial queue of task names, in order (gangs included)
    estimates: dict  # task name -> estimated seconds at its ways
    order: tuple[str, ...]  # every task name, longest estimate first
    lower_bound_s: float
    predicted_s: float | None = None  # the simulator's makespan for this plan, when known
    gangs: dict = field(default_factory=dict)  # split task name -> the workers it runs on

    def to_dict(self) -> dict:
        return {"policy": self.policy, "ways": dict(self.ways),
                "queues": {str(w): list(q) for w, q in self.queues.items()},
                "gangs": {n: list(ws) for n, ws in self.gangs.items()},
                "estimates": dict(self.estimates), "lower_bound_s": self.lower_bound_s,
                "predicted_s": self.predicted_s}


@dataclass
class Scheduler:
    """The live state of a plan: who runs what next. `assign` hands tasks to idle workers,
    `done` takes a measured time, `failed` puts a task back for another worker (up to
    `max_attempts` tries in all).

    A gang (a split task) starts when it is next in all its members' queues and they are
    all idle; a member that reaches it first waits, or takes over a single task queued
    before the gang on a member still busy (that task then starts sooner than it would
    have, so the gang cannot start later for it). Gangs keep one order in every queue
    (packing.py), so the waiting always ends. Single tasks are stolen as before."""

    plan: Plan
    max_attempts: int = 1
    queues: dict = field(init=False)
    gangs: dict = field(init=False)  # split tasks not yet started -> their workers
    estimates: dict = field(init=False)
    errors: dict = field(init=False)
    # Per worker: measured / estimated seconds of the tasks it finished (its slowness).
    _measured: dict = field(init=False)
    _estimated: dict = field(init=False)

    def __post_init__(self):
        self.queues = {w: list(q) for w, q in self.plan.queues.items()}
        self.gangs = dict(self.plan.gangs)
        self.estimates = dict(self.plan.estimates)
        self._planned = dict(self.plan.estimates)  # before rescaling; with added tasks
        self.errors = {name: [] for name in self.plan.estimates}
        self._measured = {w: 0.0 for w in self.plan.workers}
        self._estimated = {w: 0.0 for w in self.plan.workers}

    @property
    def stealing(self) -> bool:
        return self.plan.policy == "work-stealing"

    def empty(self) -> bool:
        return not self.gangs and not any(self.queues.values())

    def slowness(self, worker) -> float:
        """Measured over estimated seconds of this worker's finished tasks (1 before any)."""
        if self._estimated[worker] <= 0:
            return 1.0
        return self._measured[worker] / self._estimated[worker]

    def load(self, worker) -> float:
        return self.slowness(worker) * sum(self.estimates[n] for n in self.queues[worker])

    def _failed_on(self, name) -> set:
        return {error["rank"] for error in self.errors[name]}

    def assign(self, idle, available) -> list[tuple[str, tuple]]:
        """Tasks for idle workers now: [(task name, (worker, ...))]. `available`: the
        workers still in the run (a task goes back to a worker that failed it only when
        every available worker has)."""
        idle = sorted(idle)
        out = []
        for worker in idle:
            queue = self.queues.get(worker, [])
            if not any(worker in ws for _, ws in out) and queue and queue[0] in self.gangs:
                name = queue[0]
                members = self.gangs[name]
                if all(w in idle and not any(w in ws for _, ws in out)
                       and self.queues[w][:1] == [name] for w in members):
                    del self.gangs[name]
                    for w in members:
                        self.queues[w].pop(0)
                    out.append((name, members))
        free = set(idle) - {w for _, ws in out for w in ws}
        # Workers waiting at a gang go last: a partner that takes a task now is busy.
        for worker in sorted(free, key=lambda w: (self.queues.get(w, [])[:1] != [] and
                                                  self.queues[w][0] in self.gangs, w)):
            name = self._next_single(worker, available, free)
            if name is not None:
                free.discard(worker)
                out.append((name, (worker,)))
        return out

    def _next_single(self, worker, available, idle) -> str | None:
        def allowed(name):
            failed = self._failed_on(name)
            return worker not in failed or all(w in failed for w in available)

        own = self.queues.get(worker, [])
        for name in own:
            if name in self.gangs:
                break  # not past a gang: its partners count on this worker being there
            if allowed(name):
                own.remove(name)
                return name
        if not self.stealing:
            return None
        if own:
            # Waiting for a gang: take the last single task before it on a busy partner.
            gang = own[0] if own[0] in self.gangs else None
            for partner in (self.gangs.get(gang, ()) if gang else ()):
                if partner == worker or partner in idle:
                    continue
                before = self.queues[partner][:self.queues[partner].index(gang)]
                candidates = [n for n in before if n not in self.gangs and allowed(n)]
                if candidates:
                    self.queues[partner].remove(candidates[-1])
                    return candidates[-1]
            return None
        # Steal: the longest single task this worker may run from the most loaded queue.
        for victim in sorted((w for w in self.queues if w != worker and self.queues[w]),
                             key=lambda w: (-self.load(w), w)):
            candidates = [n for n in self.queues[victim] if n not in self.gangs and allowed(n)]
            if candidates:
                name = max(candidates, key=lambda n: (self.estimates[n], n))
                self.queues[victim].remove(name)
                return name
        return None

    def add(self, name, estimate: float, first: bool = False, prefer=()) -> None:
        """A task that arrived after the plan (acceptance's score or wider retrain): into
        the least loaded queue of the workers in `prefer` (the idle ones), else of all,
        before the first task estimated shorter, so that the queue stays longest first, or
        (`first`) ahead of every task queued there. `estimate` is in the plan's units,
        before rescaling."""
        if name in self.errors:
            raise ValueError(f"task {name!r} is already scheduled")
        self._planned[name] = estimate
        self.estimates[name] = estimate * self._rescale()
        self.errors[name] = []
        candidates = [w for w in self.queues if w in prefer] or list(self.queues)
        target = min(candidates, key=lambda w: (self.load(w), w))
        queue = self.queues[target]
        at = 0 if first else next(
            (i for i, n in enumerate(queue)
             if n not in self.gangs and self.estimates[n] < self.estimates[name]), len(queue))
        queue.insert(at, name)

    def _rescale(self) -> float:
        measured, estimated = sum(self._measured.values()), sum(self._estimated.values())
        return measured / estimated if self.stealing and estimated > 0 else 1.0

    def done(self, name, workers, seconds: float) -> None:
        """A task finished in `seconds`: note each worker's slowness; with work-stealing,
        rescale the estimates of tasks not started by measured / estimated of all so far."""
        for w in workers:
            self._measured[w] += seconds
            self._estimated[w] += self._planned[name]
        if self.stealing:
            factor = self._rescale()
            self.estimates = {n: e * factor for n, e in self._planned.items()}

    def failed(self, name, rank, text) -> list | None:
        """Note a failure on `rank`; returns the task's errors when it is given up, else
        None (it waits again: in its gang list, or in the queue of a worker that has not
        failed it, the least loaded first)."""
        lines = text.strip().splitlines()
        self.errors[name].append({"rank": rank, "error": lines[-1] if lines else "unknown error",
                                  "traceback": text})
        if len(self.errors[name]) >= self.max_attempts:
            return self.errors[name]
        if self.plan.ways.get(name, 1) > 1:  # first again in every member's queue
            self.gangs[name] = self.plan.gangs[name]
            for w in self.plan.gangs[name]:
                self.queues[w].insert(0, name)
            return None
        failed = self._failed_on(name)
        others = [w for w in self.queues if w not in failed] or list(self.queues)
        target = min(others, key=lambda w: (self.load(w), w))
        self.queues[target].insert(0, name)
        return None
