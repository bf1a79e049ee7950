"""Per-epoch checkpoints of a block task in progress, so a stopped task resumes where it was.

After every epoch the worker writes the student's weights, the optimizer's state (moments
and step count), the epoch, the history so far and the early-stopping state to one `.npz`
under a temporary name and renames it. A task that starts and finds its checkpoint carries
on from the next epoch instead of starting over; a finished task deletes it.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pbkd_mpi.atomic import atomic_path


@dataclass
class TaskState:
    epoch: int  # the last completed epoch, counted from 0
    model: list
    optimizer: list
    history: dict
    extra: dict  # figures the task computed before training (kept for the result)
    best: float | None
    best_epoch: int
    wait: int
    best_weights: list | None


def save_state(path: Path, state: TaskState) -> None:
    arrays = {f"model/{i}": a for i, a in enumerate(state.model)}
    arrays.update({f"optimizer/{i}": a for i, a in enumerate(state.optimizer)})
    if state.best_weights is not None:
        arrays.update({f"best/{i}": a for i, a in enumerate(state.best_weights)})
    meta = {"epoch": state.epoch, "history": state.history, "extra": state.extra,
            "best": state.best, "best_epoch": state.best_epoch, "wait": state.wait}
    with atomic_path(path) as tmp:
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)


def load_state(path: Path) -> TaskState | None:
    """The saved state, or None when there is no whole checkpoint to resume from."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))

            def group(prefix):
                names = [n for n in archive.files if n.startswith(prefix)]
                return [archive[n] for n in sorted(names, key=lambda n: int(n.split("/")[1]))]

            best = group("best/")
            return TaskState(meta["epoch"], group("model/"), group("optimizer/"),
                             meta["history"], meta["extra"], meta["best"], meta["best_epoch"],
                             meta["wait"], best or None)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None


def epoch_checkpoint(path: Path, early_stopping, extra: dict, resume: TaskState | None):
    """A Keras callback that saves the task's state after each epoch and, when resuming,
    puts the early-stopping state back (Keras resets it when training begins)."""
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        history: dict = {}

        def on_train_begin(self, logs=None):
            self.history = dict(resume.history) if resume else {}
            if resume is not None:
                early_stopping.best = resume.best
                early_stopping.best_epoch = resume.best_epoch
                early_stopping.wait = resume.wait
                early_stopping.best_weights = resume.best_weights

        def on_epoch_end(self, epoch, logs=None):
            values = {key: float(value) for key, value in (logs or {}).items()}
            if not all(math.isfinite(v) for v in values.values()):
                return  # never make a diverged state the one to resume from
            for key, value in values.items():
                self.history.setdefault(key, []).append(value)
            best = early_stopping.best
            save_state(path, TaskState(
                epoch=epoch,
                model=self.model.get_weights(),
                optimizer=[v.numpy() for v in self.model.optimizer.variables],
                history=self.history,
                extra=extra,
                best=None if best is None else float(best),
                best_epoch=int(early_stopping.best_epoch),
                wait=int(early_stopping.wait),
                best_weights=early_stopping.best_weights,
            ))

    return EpochCheckpoint()


def restore(model, state: TaskState) -> None:
    """Put weights and optimizer state back into a compiled model before fit()."""
    model.optimizer.build(model.trainable_variables)
    model.set_weights(state.model)
    for variable, value in zip(model.optimizer.variables, state.optimizer):
        variable.assign(value)
