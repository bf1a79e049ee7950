"""Collective phases: work every rank does together, outside the task hand-out.

Rank 0 starts a phase with `Coordinator.run_collective(name, payload, local)`; each worker
runs the handler registered here under that name as `handler(context, payload, comm,
check)`, where `context` is the pipeline's WorkerContext, `comm` the world communicator
(collectives on it go through pbkd_mpi.collectives) and `check` a callable to pass to
those collectives so a worker leaves a collective when rank 0 aborts. The value a handler
returns travels back to rank 0.

Handlers live next to the code they drive; the modules that define them are listed in
PHASE_MODULES so a worker imports them before the first phase arrives.
"""

from __future__ import annotations

import importlib

PHASE_MODULES: tuple[str, ...] = ("pbkd_mpi.schedule.profile", "pbkd_mpi.cache.stage",
                                  "pbkd_mpi.finetune.stage")

_HANDLERS: dict[str, object] = {}


def worker_phase(name: str):
    """Register the decorated function as the workers' side of phase `name`."""

    def register(function):
        if name in _HANDLERS and _HANDLERS[name] is not function:
            raise RuntimeError(f"phase {name!r} is registered twice")
        _HANDLERS[name] = function
        return function

    return register


def handlers(context, comm, check) -> dict:
    """Every registered phase, bound to this worker's context: {name: fn(payload)}."""
    for module in PHASE_MODULES:
        importlib.import_module(module)
    return {name: (lambda payload, fn=fn: fn(context, payload, comm, check))
            for name, fn in _HANDLERS.items()}
