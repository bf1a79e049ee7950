"""Collective phases: work the ranks do together, outside the task hand-out.

Rank 0 starts a phase with `Coordinator.run_collective(NAME, payload, local, ranks)`; each
worker runs its handler for NAME (the table is in commands/worker.py) as
`handler(context, payload, comm, check)`, where `context` is the `WorkerContext` below,
`comm` the world communicator, or the communicator of the phase's ranks when rank 0 does
not take part (`Coordinator.compute_ranks`; collectives go through mpi/collectives.py), and
`check` a callable to pass to those collectives so a worker leaves a collective when rank
0 aborts. The value a handler returns travels back to rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from pbkd_mpi.config import Job
from pbkd_mpi.data.dataset import Dataset

TIMING = "timing"  # workers time their share of the candidate students (model/choice_timing)
DEVICES = "devices"  # which GPU each rank chose (rank 0 looks for one no worker uses)
CACHE = "cache"  # each computing rank builds its shards of the cache (cache/stage.py)
PROFILE = "profile"  # workers time their share of the block tasks (schedule/profiling.py)
FINETUNE = "finetune"  # data-parallel fine-tuning, computing ranks (finetune/stage.py)
STATS = "stats"  # the last phase of a run: each rank's energy and memory figures


@dataclass(frozen=True)
class WorkerContext:
    """What rank 0 tells the workers before the first phase: the job and where things are."""

    job: Job
    run_dir: str
    teacher_file: str  # the teacher as a .keras file the workers load (then flatten_model)
    data_fingerprint: str  # the data rank 0 loaded: a worker that loads other data stops
    # Rank 0's index of data read from files (data/dataset.portable_index): the workers
    # open it instead of listing and checking 10^5-10^6 files each; None: data in memory.
    data_index: Dataset | None = None
