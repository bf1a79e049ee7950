"""The chained pass (`distill.chained_epochs`): each replaced block trained a little more on
the student's own input to it, so errors stop compounding from block to block.

In the parallel phase every student block learns teacher input -> teacher output. Stitched
together, block k sees what the students before it compute, which differs from the
teacher's activation it was trained on, and the differences add up along the network. The
chained pass goes through the replaced blocks in the teacher's order; for block k it
assembles the student with the weights so far (blocks before k already chained), re-
estimates its BN statistics as assembly does, writes the student's activation at block k's
input for the training and validation images to an HDF5 file, and trains block k's student
from its current weights for up to `chained_epochs` epochs on (that input, the teacher's
output from the cache). The new weights are kept only when they lower the validation MSE
on that input. The last replaced block also learns the teacher's predictions through the
teacher's head (`distill.head_weight`, head_loss.py); it is judged by what it trained for,
the assembled student's validation accuracy.

Why one block after another: block k's chained input exists only once the blocks before
it are chained, so the pass is sequential; each block is still a task handed to a worker
(retries, heartbeats, checkpoints and reuse as in the parallel phase) while the other
workers wait. Training every block at once on the inputs of the unchained student would be
parallel, but each block would then learn inputs that the blocks before it change again.
Blocks with no replaced block before them see the teacher's own input and are skipped.

Each chained task's key (keys.task_key) includes a digest of every block weight the
pass started that block from, so a resumed run reuses exactly the chained results whose
inputs it would compute again. The input files are deleted once their block is done.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import h5py
import numpy as np

from pbkd_mpi.atomic import atomic_path
from pbkd_mpi.cache.layout import chunk_rows
from pbkd_mpi.distill.head_loss import cut_head
from pbkd_mpi.distill.results import load_result, result_path
from pbkd_mpi.keys import student_blocks_key
from pbkd_mpi.model.assemble import assemble_student
from pbkd_mpi.model.evaluate import (forward_batch, recalibrate_batchnorm,
                                     recalibrated_accuracy)
from pbkd_mpi.model.graph import MODEL_INPUT, boundary_tensor



def student_inputs(teacher, blocks, block_weights, multipliers, block, x_calibrate):
    """The assembled student's model from the image to `block`'s input (BN statistics
    re-estimated on `x_calibrate`), or None when no replaced block lies before it (its input
    is then the teacher's own)."""
    import keras


    if block.input_boundary == MODEL_INPUT:
        return None
    # Which teacher layers feed the block, from the graph alone: assembling the student
    # and re-estimating its BN statistics only to find none of them replaced costs seconds.
    feeding = keras.Model(teacher.inputs, boundary_tensor(teacher, block.input_boundary))
    replaced = {layer for b in blocks if b.name in block_weights for layer in b.layers}
    if not replaced & {layer.name for layer in feeding.layers}:
        return None
    tensors: dict = {}
    student = assemble_student(teacher, blocks, block_weights, multipliers, tensors)
    prefix = keras.Model(student.inputs, tensors[block.input_boundary])
    recalibrate_batchnorm(student, x_calibrate)
    return prefix


def write_inputs(path: Path, prefix, splits: dict, name: str, dtype: str,
                 fingerprint: str) -> int:
    """`prefix`'s outputs on each split's images, as group `split`, dataset `name`, in the
    cache's dtype; written atomically. Returns the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(prefix.outputs[0].shape[1:])
    step = forward_batch(prefix)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = fingerprint
            for split, images in splits.items():
                data = f.create_group(split).create_dataset(
                    name, (len(images), *shape), dtype=dtype,
                    chunks=(chunk_rows(len(images), shape, dtype), *shape))
                for start in range(0, len(images), step):
                    batch = np.asarray(images[start:start + step], np.float32)
                    data[start:start + len(batch)] = prefix.predict_on_batch(batch)
    return path.stat().st_size


def chain_blocks(teacher, blocks, block_weights: dict[str, dict], multipliers: dict[str, int],
                 tasks: dict, job, dataset, run_dir, run_task, log) -> tuple[dict, dict]:
    """The chained pass over the replaced blocks (`block_weights`), in the teacher's order.

    `tasks`: the parallel phase's BlockTask per block (a chained task is derived from it);
    `run_task(task) -> (result or None when it failed, records)` runs one task on a
    worker and saves its result (a saved one is reused without running it). Returns (the block
    weights after the pass, the report's `chained`)."""
    current = dict(block_weights)
    rows = []
    replaced = [b for b in blocks if b.name in block_weights]
    for block in replaced:
        started = time.perf_counter()
        head = _head(teacher, block, block is replaced[-1], job, log)
        task = _chained_task(tasks[block.name], block, current, multipliers, head,
                             Path(run_dir) / "chain", job.distill.chained_epochs)
        row = {"name": block.name, "input_bytes": 0, "reused": False,
               "head_weight": head.weight if head is not None else 0.0}
        result = _train(task, teacher, blocks, current, multipliers, dataset, job, run_dir,
                        run_task, row)
        if result is not None:
            row |= _judge(result, head, block, teacher, blocks, current, multipliers, dataset)
            if row["kept"]:
                current[block.name] = result["weights"]
            _log_chained(log, block, result, row, head)
        rows.append(row | {"seconds": time.perf_counter() - started})
    return current, {"epochs": job.distill.chained_epochs, "blocks": rows,
                     "input_bytes_max": max((r["input_bytes"] for r in rows), default=0)}


def _head(teacher, block, last: bool, job, log):
    """The teacher's head as a loss for the last replaced block (after it, the student is
    the teacher's own layers), or None."""
    if not last:
        return None
    head = cut_head(teacher, block.output_boundary, job.distill.head_weight,
                    job.finetune.temperature)
    if head is None and job.distill.head_weight > 0:
        log(f"chained {block.name}: MSE alone (the teacher's layers after it read more "
            f"than its output, or cannot be rebuilt on a worker)")
    return head


def _chained_task(base, block, current, multipliers, head, folder: Path, epochs: int):
    """The parallel phase's task of `block`, trained on the student's own input to it."""
    digest = student_blocks_key(current, multipliers)
    return dataclasses.replace(
        base, config=dataclasses.replace(base.config, epochs=epochs),
        depth_multiplier=multipliers[block.name], initial_weights=current[block.name],
        source=dataclasses.replace(base.source, views=0),
        input_path=str(folder / f"{block.name}-{digest}.h5"), input_digest=digest,
        head_loss=head)


def _train(task, teacher, blocks, current, multipliers, dataset, job, run_dir, run_task,
           row: dict) -> dict | None:
    """The chained task's result: an earlier run's, or trained now on inputs written for it
    (deleted after). None, with the reason in `row`, when there is none."""
    saved = load_result(result_path(run_dir, task))
    if saved is not None:
        row["reused"] = True
        return saved[0]
    started = time.perf_counter()
    block = task.block
    prefix = student_inputs(teacher, blocks, current, multipliers, block, dataset.x_train)
    if prefix is None:
        row["skipped"] = "no replaced block before it"
        return None
    row["input_bytes"] = write_inputs(
        Path(task.input_path), prefix, {"train": dataset.x_train, "val": dataset.x_val},
        block.input_boundary, job.cache.dtype, task.input_digest)
    row["input_seconds"] = time.perf_counter() - started
    try:
        result, _ = run_task(task)
    finally:
        Path(task.input_path).unlink(missing_ok=True)
    if result is None:  # the task failed on every attempt: the block keeps its weights
        row["failed"] = True
    return result


def _judge(result, head, block, teacher, blocks, current, multipliers, dataset) -> dict:
    """Whether the chained weights are kept, with the figures that decided it."""
    loss_before = result.get("initial_val_loss", result["initial_val_mse"])
    loss_after = result.get("val_loss", result["val_mse"])
    figures = {"val_mse_before": result["initial_val_mse"], "val_mse": result["val_mse"],
               "val_loss_before": loss_before, "val_loss": loss_after,
               "epochs": result["epochs"]}
    if head is None:  # judged on the loss it trained on, its MSE
        return figures | {"kept": loss_after < loss_before}
    # Trained for the classifier: judged by the assembled student's validation accuracy,
    # BN statistics re-estimated as assembly does. Its own loss is taken with the block's
    # BN statistics alone, which assembly replaces (on the deep job it rose while the
    # student's accuracy rose too: docs/usage.md).
    accuracy_before, accuracy_after = (
        recalibrated_accuracy(assemble_student(teacher, blocks, weights, multipliers),
                              dataset.x_val, dataset.y_val, dataset.x_train)
        for weights in (current, {**current, block.name: result["weights"]}))
    return {"val_accuracy_before": accuracy_before, "val_accuracy": accuracy_after,
            **figures, "kept": accuracy_after > accuracy_before}


def _log_chained(log, block, result, row: dict, head) -> None:
    log(f"chained {block.name}: val MSE on the student's input "
        f"{result['initial_val_mse']:.4g} -> {result['val_mse']:.4g}"
        + (f", with the teacher's head {row['val_loss_before']:.4g} -> {row['val_loss']:.4g}, "
           f"the student's val accuracy {row['val_accuracy_before']:.4f} -> "
           f"{row['val_accuracy']:.4f}" if head is not None else "")
        + ("" if row["kept"] else " (no better: earlier weights kept)"))


def skipped_pass(job, source, log) -> dict | None:
    """The report's `chained` when the job asks for a chained pass that cannot run (no
    cache to read its targets from, in recompute mode); None otherwise."""
    if not (job.distill.chained_epochs and source.mode == "recompute"):
        return None
    reason = "cache.mode resolved to recompute: no cache to read targets from"
    log(f"chained pass skipped: {reason}")
    return {"epochs": job.distill.chained_epochs, "blocks": [], "input_bytes_max": 0,
            "skipped": reason}
