"""Whole-run projection: every phase of a measured run at other worker counts (pure).

Each phase after the teacher scales by its own rule, from the seconds the run measured:

- `cache`: the teacher's forward pass and the shard writes are shared by every rank:
  seconds x measured ranks / ranks;
- `distill`: the work-stealing (+split) makespan simulated from the run's profile at w
  workers (schedule/projection.py), calibrated by the measured makespan over the one
  simulated at the measured worker count;
- `finetune`: data-parallel over every rank: seconds x measured ranks / ranks (ideal: the
  gradients' allreduce is not modelled, so this is optimistic at many ranks);
- `blocks`, `profile` (each worker times its share at the same time), `accept`, `chain`
  and `assemble`: sequential in this version, unchanged.

The sequential share is the unchanged phases' part of the projected total: by Amdahl's
law, 1 / that share bounds the speedup however many workers there are.
"""

from __future__ import annotations

from typing import Callable

# Phase -> how its seconds scale with workers; the phases a run spends after its teacher.
PHASE_SCALING = {"blocks": "fixed", "cache": "ranks", "profile": "fixed",
                 "distill": "schedule", "accept": "fixed", "chain": "fixed",
                 "assemble": "fixed", "finetune": "ranks"}


def sequential_share(phases: dict) -> float:
    """The share of a run's time after its teacher spent in phases that do not shrink
    with workers."""
    total = sum(phases.get(name, 0.0) for name in PHASE_SCALING)
    fixed = sum(phases.get(name, 0.0) for name, rule in PHASE_SCALING.items()
                if rule == "fixed")
    return fixed / total if total > 0 else 0.0


def project_run(phases: dict, measured_workers: int, makespan_for: Callable[[int], float],
                workers_list) -> dict:
    """{workers: {"phases_s", "total_s", "speedup", "sequential_share"}}; `phases` are the
    run's measured seconds, `makespan_for(w)` the simulated distillation makespan at w
    workers. Speedups are against the projection at 1 worker."""
    simulated = makespan_for(measured_workers)
    calibration = phases.get("distill", 0.0) / simulated if simulated > 0 else 1.0
    measured_ranks = measured_workers + 1

    def one(workers: int) -> dict:
        projected = {}
        for name, rule in PHASE_SCALING.items():
            seconds = phases.get(name, 0.0)
            if rule == "ranks":
                seconds *= measured_ranks / (workers + 1)
            elif rule == "schedule":
                seconds = makespan_for(workers) * calibration
            projected[name] = seconds
        return {"phases_s": projected, "total_s": sum(projected.values()),
                "sequential_share": sequential_share(projected)}

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
                 "phases (schedule/whole_run.py: cache and fine-tuning shared by every "
                 "rank, distillation simulated, the rest sequential); speedup against 1 "
                 "worker; sequential: the share of the unchanged phases.")
    return "\n".join(lines)
