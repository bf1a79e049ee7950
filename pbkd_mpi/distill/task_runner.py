"""Run one block task where it landed: a worker rank, or rank 0's own training thread.

A task is a `train_block.BlockTask` (one block, one rank), a `mpi/protocol.SplitPart` (one of the
k ranks training a split block together) or a `score.ScoreTask` (acceptance's solo swap). Both log to the rank's log, count their time and
energy as a task on the rank's meter, checkpoint every epoch in the run directory, and stop
between batches when `stop_check()` raises (a signal, or rank 0 asking to abort).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pbkd_mpi.distill.results import progress_path
from pbkd_mpi.distill.score import ScoreTask, run_score
from pbkd_mpi.distill.split_block import train_split_part
from pbkd_mpi.distill.train_block import train_block
from pbkd_mpi.mpi import faults, preemption, supervisor
from pbkd_mpi.mpi.protocol import AbortRequested, SplitPart
from pbkd_mpi.output.logs import LOGGER, epoch_logger, tensorboard_logger


def task_runner(run_dir: str, meter, stop_check):
    """`run(task) -> result` for this rank."""
    tb_dir = Path(run_dir) / "tb"
    if meter is None:  # rank 0 run without an energy meter (tests of the pipeline)
        def count(_name):
            return contextlib.nullcontext()
    else:
        count = meter.task
    callback = preemption.keras_callback("training a block", also=stop_check)

    def run(task):
        if isinstance(task, ScoreTask):  # acceptance's solo swap: no training, no meter
            supervisor.note(f"scoring {task.name}", run_dir=run_dir)
            result = run_score(task)
            LOGGER.info("score %s%s: val accuracy %.4f in %.1f s", task.name,
                        " (wider)" if task.wider else "", result["val_accuracy"],
                        result["seconds"])
            return result
        name = task.task.block.name if isinstance(task, SplitPart) else task.block.name
        LOGGER.info("task %s: started", name)
        supervisor.note(f"training block {name}", run_dir=run_dir)
        faults.task_started()
        if isinstance(task, SplitPart):  # one of k ranks training a split block together

            with count(name):
                return train_split_part(task, check=stop_check)
        try:
            with count(name):
                result = train_block(
                    task, callbacks=[callback, epoch_logger(f"task {name}"),
                                     tensorboard_logger(tb_dir / "blocks" / name)],
                    checkpoint_path=progress_path(run_dir, task))
        except (AbortRequested, preemption.Preempted) as stop:
            LOGGER.warning("task %s: stopped (%s); its last epoch is checkpointed", name, stop)
            raise
        except Exception:
            LOGGER.exception("task %s: failed", name)
            raise
        LOGGER.info("task %s: done in %.1f s, %d epoch(s), val MSE %.4g", name,
                    result["train_seconds"], result["epochs"], result["val_mse"])
        return result

    return run
