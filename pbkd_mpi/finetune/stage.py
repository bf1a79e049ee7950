"""The collective phase "finetune": the computing ranks fine-tune the student together.

Rank 0 saves the assembled student as a .keras file in the run directory and starts the
phase with a `FinetuneRequest`; each worker loads the teacher and the data (checked against
rank 0's hashes), the student file, and the teacher's logits from the activation cache,
then runs finetune.finetune with the others. The ranks are those that train block tasks
(Coordinator.compute_ranks): the workers, and rank 0 only when it has a device of its own.
On a node the workers fill (cores shared among them, or rank 0's GPU also a worker's),
rank 0 beside them would halve one rank's speed and every synchronous step would wait for
it: measured on the demo with 2 workers on 2 cores, an epoch took 4.3 s on 3 ranks and
3.3 s on the 2 workers. The weights end identical on every rank (data_parallel); when rank
0 does not train, the first worker sends them back with the summary, and relays each epoch
to rank 0's display (console line, log, TensorBoard) as it ends.

A finished fine-tuning is kept in RUN/finetune/ under a key of everything it depends on
(`finetune_key`): a run that stops later (an export failing, a kill, a signal) and is run
again reuses it instead of fine-tuning again.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pbkd_mpi.atomic import atomic_path
from pbkd_mpi.cache.layout import require_complete
from pbkd_mpi.cache.reader import load_teacher_and_data
from pbkd_mpi.finetune.train import FinetuneData, finetune
from pbkd_mpi.keys import finetune_key, weights_digest
from pbkd_mpi.model.evaluate import predict_batches
from pbkd_mpi.model.logits import (apply_affine, final_affine, logit_boundary,
                                   logits_from_boundary)
from pbkd_mpi.model.teacher import save_model_atomically
from pbkd_mpi.mpi import phases
from pbkd_mpi.output.console import progress_callbacks, relay_callback, replay


@dataclass(frozen=True)
class FinetuneRequest:
    student_file: str  # the assembled student, saved by rank 0
    cache_path: str  # "" in recompute mode: the teacher then runs once over the data
    cache_fingerprint: str
    teacher_fingerprint: str
    # The workers train alone: the first sends its epochs to rank 0 and its weights back.
    workers_only: bool = False


class CachedLogits:
    """The teacher's logits of one split, read from the activation cache a batch of rows at
    a time: held whole, the boundary values of a 224 px ResNet50 (2,048 features before
    its classifier) would be 8 GB as float32 per rank at 10^6 images."""

    def __init__(self, boundary, affine):
        self.boundary, self.affine = boundary, affine  # an h5py dataset, final_affine's

    def __len__(self) -> int:
        return len(self.boundary)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")  # HDF5 reads rows in increasing order
        values = np.empty((len(rows), *self.boundary.shape[1:]), self.boundary.dtype)
        if len(rows):
            values[order] = self.boundary[rows[order]]
        return apply_affine(self.affine, values)


@contextmanager
def teacher_logits(teacher, dataset, cache_path: str = "", fingerprint: str = ""):
    """(train, val) teacher logits: read from the cache's copy of `logit_boundary(teacher)`
    a batch at a time (`CachedLogits`, the file open while the context lasts); with no
    cache, from one pass of the teacher over the two splits (never per step), held."""
    import keras

    name = logit_boundary(teacher)
    if not cache_path:
        cut = keras.Model(teacher.inputs, teacher.get_layer(name).output)
        yield tuple(logits_from_boundary(teacher, predict_batches(cut, x))
                    for x in (dataset.x_train, dataset.x_val))
        return
    require_complete(cache_path, fingerprint)
    with h5py.File(cache_path, "r") as f:
        if name not in f["train"]:
            raise ValueError(f"the activation cache {cache_path!r} lacks the teacher's "
                             f"logit boundary {name!r}; it holds {sorted(f['train'])}")
        affine = final_affine(teacher)
        yield tuple(CachedLogits(f[split][name], affine) for split in ("train", "val"))


def run_finetune(student, teacher, dataset, job, request: FinetuneRequest, comm, check,
                 callbacks=()) -> dict:
    """One rank's answer of the phase (rank 0 passes its own student and callbacks)."""
    if job.finetune.loss != "distill" or job.finetune.epochs == 0:
        return finetune(student, FinetuneData.of(dataset), job.finetune, comm, job.run.seed,
                        check=check, callbacks=callbacks)
    with teacher_logits(teacher, dataset, request.cache_path,
                        request.cache_fingerprint) as logits:
        return finetune(student, FinetuneData.of(dataset, logits), job.finetune, comm,
                        job.run.seed, check=check, callbacks=callbacks)


def finetune_on_worker(context, request: FinetuneRequest, comm, check, progress=None) -> dict:
    """A worker's part; `progress(event)` sends rank 0 an event for its display."""
    import keras

    teacher, dataset = load_teacher_and_data(
        context.teacher_file, request.teacher_fingerprint, context.job.data,
        context.data_fingerprint, context.job.run.seed)
    student = keras.saving.load_model(request.student_file, compile=False)
    lead = request.workers_only and comm.Get_rank() == 0
    summary = run_finetune(student, teacher, dataset, context.job, request, comm, check,
                           [relay_callback(progress)] if lead and progress else ())
    # A digest lets rank 0 confirm the ranks ended identical.
    answer = {"weights_digest": weights_digest(student), "epochs": summary["epochs"]}
    if lead:
        answer |= {"summary": summary, "weights": student.get_weights()}
    return answer


def _finetune_paths(run_dir, key: str) -> tuple[Path, Path]:
    folder = Path(run_dir) / "finetune"
    return folder / f"student-{key}.keras", folder / f"summary-{key}.json"


def save_finetuned(run_dir, key: str, student, summary: dict) -> None:
    """The fine-tuned student, then its summary; each written atomically, and the summary
    last, so that its presence means both are complete."""
    model_path, summary_path = _finetune_paths(run_dir, key)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    save_model_atomically(student, model_path)
    with atomic_path(summary_path) as tmp:
        Path(tmp).write_text(json.dumps(summary))


def load_finetuned(run_dir, key: str, student) -> dict | None:
    """An earlier run's summary, with its weights put into `student`; None when there is
    none (or it cannot be read: then fine-tuning runs again and replaces it)."""
    import keras

    model_path, summary_path = _finetune_paths(run_dir, key)
    try:
        summary = json.loads(summary_path.read_text())
        student.set_weights(keras.saving.load_model(model_path, compile=False).get_weights())
    except (OSError, ValueError):
        return None
    return summary


def finetune_stage(student, teacher, dataset, job, request: FinetuneRequest, run_dir,
                   coordinator, log) -> dict:
    """Rank 0: fine-tune `student` on the computing ranks (or take an earlier run's
    fine-tuning of the same student and settings from RUN/finetune/). Returns the
    report's `finetune`."""
    ranks = coordinator.compute_ranks
    key = finetune_key(student, job.finetune, dataset.fingerprint(),
                       request.teacher_fingerprint, job.run.seed,
                       coordinator.comm.Get_size() if ranks is None else len(ranks))
    tuned = load_finetuned(run_dir, key, student)
    if tuned is not None:
        tuned["reused"] = True
        log(f"fine-tuning: reusing the fine-tuned student of an earlier run "
            f"(RUN/finetune/student-{key}.keras)")
    else:
        callbacks = progress_callbacks(log, "fine-tuning", job.finetune.epochs,
                                       Path(run_dir) / "tb" / "finetune")
        if ranks is None:  # rank 0 trains too, with its own callbacks
            answers = coordinator.run_collective(
                phases.FINETUNE, request,
                lambda check: run_finetune(student, teacher, dataset, job, request,
                                           coordinator.comm, check, callbacks))
            tuned = answers[0]
        else:
            for callback in callbacks:
                callback.set_model(student)
            answers = coordinator.run_collective(
                phases.FINETUNE, dataclasses.replace(request, workers_only=True), ranks=ranks,
                on_progress=lambda rank, event: replay(callbacks, event))
            lead = answers[ranks[0]]
            student.set_weights(lead.pop("weights"))
            tuned = lead.pop("summary")
        tuned = tuned | {"reused": False}
        tuned["identical_weights"] = all(answer["weights_digest"] == weights_digest(student)
                                         for rank, answer in answers.items()
                                         if answer is not None and rank != 0)
        save_finetuned(run_dir, key, student, tuned)
    _log_finetuned(tuned, log)
    return tuned


def _log_finetuned(tuned: dict, log) -> None:
    log(f"fine-tuning on {tuned['ranks']} ranks: {tuned['epochs']} epochs, val accuracy "
        f"{tuned['val_accuracy_before']:.3f} -> {tuned['val_accuracy']:.3f}"
        + ("" if tuned["identical_weights"] else "; WARNING: ranks ended with different weights"))
    for recovery in tuned["recoveries"]:
        log(f"fine-tuning diverged at epoch {recovery['epoch']} ({recovery['reason']}): best "
            f"weights restored, learning rate x{recovery['learning_rate_scale']:.3g}")
