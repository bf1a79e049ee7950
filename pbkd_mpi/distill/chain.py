"""The chained pass (`distill.chained_epochs`): each replaced block trained a little more on
the student's own input to it, so errors stop compounding from block to block.

In the parallel phase every student block learns teacher input -> teacher output. Stitched
together, block k sees what the students before it compute, which differs from the
teacher's activation it was trained on, and the differences add up along the network. The
chained pass trains block k's student from its current weights for up to `chained_epochs`
epochs on (the assembled student's activation at block k's input, the teacher's output
from the cache). The inputs are computed on rank 0 with the student assembled and its BN
statistics re-estimated as assembly does, written to HDF5 for the training and validation
images, and deleted once used. The new weights are kept only when they lower the
validation MSE on that input. The last replaced block also learns the teacher's
predictions through the teacher's head (`distill.head_weight`, head_loss.py); it is judged
by what it trained for, the assembled student's validation accuracy.

`distill.chained_order` picks whose input block k learns:
- `parallel`: the parallel phase's students before it. One forward pass writes every
  block's input, and every block is a task at once, spread over the workers as the
  parallel phase's are. Block k's predecessors change again while it trains, by their own
  (smaller) chained correction. The last replaced block is the exception: it goes after
  the others, on their chained outputs, since it learns the teacher's predictions.
- `sequential`: the students before it after their own chained training, so the pass goes
  one block after another and the other workers wait; each input is its own forward pass.
Blocks with no replaced block before them see the teacher's own input and are skipped.
Either way each chained block is a task on a worker (retries, heartbeats, checkpoints and
reuse as in the parallel phase).

Each chained task's key (keys.task_key) includes a digest of every block weight its input
was computed from, so a resumed run reuses exactly the chained results whose inputs it
would compute again.
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



def fed_by_student(teacher, blocks, block_weights: dict, block) -> bool:
    """Whether a replaced block (one in `block_weights`) lies before `block`; if none does,
    its input is the teacher's own and there is nothing to chain. From the graph alone:
    assembling the student and re-estimating its BN statistics to find out costs seconds."""
    import keras


    if block.input_boundary == MODEL_INPUT:
        return False
    feeding = keras.Model(teacher.inputs, boundary_tensor(teacher, block.input_boundary))
    replaced = {layer for b in blocks if b.name in block_weights for layer in b.layers}
    return bool(replaced & {layer.name for layer in feeding.layers})


def student_inputs(teacher, blocks, block_weights, multipliers, targets, x_calibrate):
    """The assembled student's model from the image to the input of each block of
    `targets` (one output each, in that order), BN statistics re-estimated on
    `x_calibrate`."""
    import keras


    tensors: dict = {}
    student = assemble_student(teacher, blocks, block_weights, multipliers, tensors)
    model = keras.Model(student.inputs, [tensors[block.input_boundary] for block in targets])
    recalibrate_batchnorm(student, x_calibrate)
    return model


def write_inputs(path: Path, model, names, splits: dict, dtype: str, fingerprint: str) -> int:
    """`model`'s outputs on each split's images, as group `split` holding one dataset per
    output (named by `names`), in the cache's dtype; written atomically in one forward pass
    per batch. Returns the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(output.shape[1:]) for output in model.outputs]
    step = forward_batch(model)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = fingerprint
            for split, images in splits.items():
                group = f.create_group(split)
                datasets = [group.create_dataset(
                    name, (len(images), *shape), dtype=dtype,
                    chunks=(chunk_rows(len(images), shape, dtype), *shape))
                    for name, shape in zip(names, shapes)]
                for start in range(0, len(images), step):
                    batch = np.asarray(images[start:start + step], np.float32)
                    values = model.predict_on_batch(batch)
                    if not isinstance(values, (list, tuple)):
                        values = [values]
                    for data, value in zip(datasets, values):
                        # Converted here: HDF5's own float32 -> float16 conversion took 20 s
                        # of the demo's 21 s to write its chained inputs, numpy's 1 s.
                        data[start:start + len(batch)] = np.asarray(value, data.dtype)
    return path.stat().st_size


def chain_blocks(teacher, blocks, block_weights: dict[str, dict], multipliers: dict[str, int],
                 tasks: dict, job, dataset, run_dir, run_tasks, log) -> tuple[dict, dict]:
    """The chained pass over the replaced blocks (`block_weights`), in the order
    `distill.chained_order` says.

    `tasks`: the parallel phase's BlockTask per block (a chained task is derived from it);
    `run_tasks({name: task}) -> {name: result}` runs the tasks on the workers and saves
    their results (a task that failed on every attempt has none). Returns (the block
    weights after the pass, the report's `chained`)."""
    replaced = [b for b in blocks if b.name in block_weights]
    heads = {b.name: _head(teacher, b, b is replaced[-1], job, log) for b in replaced}
    rows = {b.name: {"name": b.name, "input_bytes": 0, "reused": False,
                     "head_weight": heads[b.name].weight if heads[b.name] else 0.0}
            for b in replaced}
    context = _Pass(teacher, blocks, multipliers, tasks, job, dataset, Path(run_dir),
                    run_tasks, heads, rows)
    current = dict(block_weights)
    if job.distill.chained_order == "parallel" and len(replaced) > 2:
        # The last block goes after the others, on their chained outputs: it learns the
        # teacher's predictions, and the student's accuracy depends on it most (measured on
        # the demo: docs/usage.md).
        summary = _parallel(context, replaced[:-1], current, log)
        last = _sequential(context, replaced[-1:], current, log)
        summary = {"input_bytes_max": max(summary["input_bytes_max"], last["input_bytes_max"]),
                   "input_seconds": summary["input_seconds"] + last["input_seconds"],
                   "parallel_s": summary["parallel_s"]}
    else:
        summary = _sequential(context, replaced, current, log)
    return current, {"epochs": job.distill.chained_epochs, "order": job.distill.chained_order,
                     **summary, "blocks": [rows[b.name] for b in replaced]}


@dataclasses.dataclass(frozen=True)
class _Pass:
    """What both orders of the pass read."""

    teacher: object
    blocks: list
    multipliers: dict
    tasks: dict  # the parallel phase's, by block name
    job: object
    dataset: object
    run_dir: Path
    run_tasks: object
    heads: dict  # block name -> HeadLoss or None
    rows: dict  # block name -> the report's row, filled in as the pass goes

    def task(self, block, current: dict, input_path: Path, digest: str):
        """The parallel phase's task of `block`, trained on the student's own input to it
        (computed from the weights `current`, whose key is `digest`), from its current
        weights."""
        base = self.tasks[block.name]
        return dataclasses.replace(
            base, config=dataclasses.replace(base.config,
                                             epochs=self.job.distill.chained_epochs),
            block=block, depth_multiplier=self.multipliers[block.name],
            initial_weights=current[block.name],
            source=dataclasses.replace(base.source, views=0),
            input_path=str(input_path), input_digest=digest, head_loss=self.heads[block.name])

    def saved(self, task) -> dict | None:
        """An earlier run's result of this chained task."""
        saved = load_result(result_path(self.run_dir, task))
        if saved is not None:
            self.rows[task.block.name]["reused"] = True
        return saved[0] if saved is not None else None

    def inputs(self, current: dict, chained: list, path: Path, digest: str) -> int:
        """Write the student's inputs to each block of `chained` into `path`."""
        model = student_inputs(self.teacher, self.blocks, current, self.multipliers, chained,
                               self.dataset.x_train)
        return write_inputs(path, model, [block.input_boundary for block in chained],
                            {"train": self.dataset.x_train, "val": self.dataset.x_val},
                            self.job.cache.dtype, digest)

    def settle(self, block, result: dict | None, current: dict, log) -> None:
        """Judge `block`'s chained result against `current` and keep it there if better."""
        row = self.rows[block.name]
        if result is None:  # the task failed on every attempt: the block keeps its weights
            row["failed"] = True
            return
        row |= _judge(result, self.heads[block.name], block, self.teacher, self.blocks,
                      current, self.multipliers, self.dataset)
        row.setdefault("seconds", result.get("train_seconds", 0.0))
        if row["kept"]:
            current[block.name] = result["weights"]
        _log_chained(log, block, result, row, self.heads[block.name])


def _parallel(context: _Pass, replaced, current: dict, log) -> dict:
    """Every block of `replaced` at once, on the inputs of the students in `current` (one
    file for all); `current` takes the chained weights kept."""
    digest = student_blocks_key(current, context.multipliers)
    path = context.run_dir / "chain" / f"inputs-{digest}.h5"
    chained = {}
    for block in replaced:
        if fed_by_student(context.teacher, context.blocks, current, block):
            chained[block.name] = context.task(block, current, path, digest)
        else:
            context.rows[block.name] |= {"skipped": "no replaced block before it",
                                         "seconds": 0.0}
    results = {name: result for name, task in chained.items()
               if (result := context.saved(task)) is not None}
    todo = {name: task for name, task in chained.items() if name not in results}
    started, file_bytes, input_seconds, parallel_s = time.perf_counter(), 0, 0.0, 0.0
    if todo:
        file_bytes = context.inputs(current, [task.block for task in todo.values()], path,
                                    digest)
        for name, task in todo.items():
            context.rows[name]["input_bytes"] = _array_bytes(task.block, context)
        input_seconds = time.perf_counter() - started
        log(f"chained pass: the students' inputs to {len(todo)} block(s) written "
            f"({file_bytes / 2**20:,.0f} MB, {input_seconds:.1f} s); training them at once")
        for name in todo:
            context.rows[name]["parallel"] = True
        try:
            results |= context.run_tasks(todo)
        finally:
            path.unlink(missing_ok=True)
        parallel_s = time.perf_counter() - started - input_seconds
    # In the teacher's order: the block trained through the head is last, judged with the
    # others' chosen weights in place.
    for block in replaced:
        if block.name in chained:
            context.settle(block, results.get(block.name), current, log)
    return {"input_bytes_max": file_bytes, "input_seconds": input_seconds,
            "parallel_s": parallel_s}


def _array_bytes(block, context: _Pass) -> int:
    """Bytes of one block's student inputs (training and validation images)."""
    samples = len(context.dataset.x_train) + len(context.dataset.x_val)
    return int(samples * np.prod(block.input_shape) * np.dtype(context.job.cache.dtype).itemsize)


def _sequential(context: _Pass, replaced, current: dict, log) -> dict:
    """One block of `replaced` after another, each on the inputs of the blocks before it
    as chained so far; `current` takes the chained weights kept."""
    input_seconds = 0.0
    for block in replaced:
        started, row = time.perf_counter(), context.rows[block.name]
        if not fed_by_student(context.teacher, context.blocks, current, block):
            row |= {"skipped": "no replaced block before it", "seconds": 0.0}
            continue
        digest = student_blocks_key(current, context.multipliers)
        path = context.run_dir / "chain" / f"{block.name}-{digest}.h5"
        task = context.task(block, current, path, digest)
        result = context.saved(task)
        if result is None:
            row["input_bytes"] = context.inputs(current, [block], path, digest)
            row["input_seconds"] = time.perf_counter() - started
            input_seconds += row["input_seconds"]
            try:
                result = context.run_tasks({block.name: task}).get(block.name)
            finally:
                path.unlink(missing_ok=True)
        row["seconds"] = time.perf_counter() - started
        context.settle(block, result, current, log)
    return {"input_bytes_max": max((context.rows[b.name]["input_bytes"] for b in replaced),
                                   default=0),
            "input_seconds": input_seconds, "parallel_s": 0.0}


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
