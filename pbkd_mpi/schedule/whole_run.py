"""Whole-run projection: every phase of a measured run at other worker counts (pure).

Each phase after the teacher scales by its own rule, from the seconds the run measured:

- `cache`: the teacher's forward pass and the shard writes are shared by the computing
  ranks (the workers, and rank 0 when it trains block tasks too): seconds x measured
  computing ranks / computing ranks;
- `distill`: the work-stealing (+split) makespan simulated from the run's profile at w
  workers (schedule/projection.py), calibrated by the measured makespan over the one
  simulated at the measured worker count; acceptance's scores and wider retrains are
  tasks inside it (distill/accept.py), so they scale with it;
- `chain`: its parallel part (report.json `chained.parallel_s`: the blocks trained at
  once) as the longest-first makespan of those blocks' measured seconds at w workers,
  calibrated the same way; the rest (computing the inputs on rank 0, the last block after
  the others) unchanged;
- `finetune`: data-parallel over the computing ranks, the same rule (ideal: the
  gradients' allreduce is not modelled, so this is optimistic at many ranks);
- `profile` and `blocks` (choosing the students: the workers time the candidates of their
  share of the blocks, model/choice_timing.py): each worker its share at the same time:
  seconds x measured workers / workers;
- `accept` (what is left of it after distillation) and `assemble`: sequential,
  unchanged.


The sequential share is the unchanged phases' (and the chain's unchanged part's) share of
the projected total: by Amdahl's law, 1 / that share bounds the speedup however many
workers there are.
"""

from __future__ import annotations

from typing import Callable

# Phase -> how its seconds scale with workers; the phases a run spends after its teacher.
PHASE_SCALING = {"blocks": "workers", "cache": "ranks", "profile": "workers",
                 "distill": "schedule", "accept": "fixed", "chain": "chained",
                 "assemble": "fixed", "finetune": "ranks"}


def sequential_share(phases: dict, chained: dict | None = None) -> float:
    """The share of a run's time after its teacher spent in phases (or their parts) that
    do not shrink with workers. `chained`: report.json `chained` (its `parallel_s`)."""
    total = sum(phases.get(name, 0.0) for name in PHASE_SCALING)
    fixed = sum(phases.get(name, 0.0) for name, rule in PHASE_SCALING.items()
                if rule == "fixed")
    fixed += max(0.0, phases.get("chain", 0.0) - _parallel_chain(chained)[0])
    return fixed / total if total > 0 else 0.0


def _parallel_chain(chained: dict | None) -> tuple[float, list]:
    """(wall seconds of the chained pass's parallel part, its blocks' training seconds)."""
    if not chained:
        return 0.0, []
    return (float(chained.get("parallel_s", 0.0)),
            [row["seconds"] for row in chained.get("blocks", []) if row.get("parallel")])


def longest_first_makespan(seconds: list, workers: int) -> float:
    """Tasks of these seconds handed longest first to the earliest free of `workers`."""
    loads = [0.0] * max(1, workers)
    for task in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += task
    return max(loads)


def project_run(phases: dict, measured_workers: int, makespan_for: Callable[[int], float],
                workers_list, chained: dict | None = None, rank0_computes: bool = False
                ) -> dict:
    """{workers: {"phases_s", "total_s", "speedup", "sequential_share"}}; `phases` are the
    run's measured seconds, `makespan_for(w)` the simulated distillation makespan at w
    workers, `chained` the run's report.json `chained`, `rank0_computes` its
    `distill.coordinator_trains`. Speedups are against the projection at 1 worker."""
    simulated = makespan_for(measured_workers)
    calibration = phases.get("distill", 0.0) / simulated if simulated > 0 else 1.0
    extra = 1 if rank0_computes else 0
    measured_ranks = measured_workers + extra
    parallel_s, chained_seconds = _parallel_chain(chained)
    chain_measured = longest_first_makespan(chained_seconds, measured_workers)
    chain_calibration = parallel_s / chain_measured if chain_measured > 0 else 0.0
    chain_fixed = max(0.0, phases.get("chain", 0.0) - parallel_s)

    def one(workers: int) -> dict:
        projected = {}
        for name, rule in PHASE_SCALING.items():
            seconds = phases.get(name, 0.0)
            if rule == "ranks":
                seconds *= measured_ranks / (workers + extra)
            elif rule == "workers":
                seconds *= measured_workers / workers
            elif rule == "schedule":
                seconds = makespan_for(workers) * calibration
            elif rule == "chained":
                seconds = chain_fixed + chain_calibration * longest_first_makespan(
                    chained_seconds, workers)
            projected[name] = seconds
        parallel = projected["chain"] - chain_fixed
        return {"phases_s": projected, "total_s": sum(projected.values()),
                "sequential_share": sequential_share(projected, {"parallel_s": parallel})}

    base = one(1)["total_s"]
    table = {}
    for workers in workers_list:
        row = one(workers)
        table[workers] = {**row, "speedup": base / row["total_s"] if row["total_s"] else 1.0}
    return table


def render_projection(table: dict, title: str = "") -> str:
    names = list(PHASE_SCALING)
    lines = [title] if title else []
    lines.append(f"{'workers':>7}  " + "  ".join(f"{n:>9}" for n in names)
                 + f"  {'total s':>9}  {'speedup':>7}  {'sequential':>10}")
    for workers, row in table.items():
        cells = "  ".join(f"{row['phases_s'][n]:>9.1f}" for n in names)
        lines.append(f"{workers:>7}  {cells}  {row['total_s']:>9.1f}  "
                     f"{row['speedup']:>6.2f}x  {row['sequential_share']:>9.1%}")
    lines.append("Seconds per phase after the teacher, projected from the run's measured "
                 "phases (schedule/whole_run.py: cache and fine-tuning shared by the "
                 "computing ranks, distillation simulated, the chained pass's parallel part by its "
                 "blocks' times, the rest sequential); speedup against 1 worker; "
                 "sequential: the share of the unchanged phases and parts.")
    return "\n".join(lines)
