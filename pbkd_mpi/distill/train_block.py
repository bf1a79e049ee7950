"""One block task: build the student block and train it with MSE on cached teacher pairs.

Runs on a worker rank. The seed depends on the block only, never on the rank or the order
of tasks, so the same job trains the same block weights whichever worker gets the block.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pbkd_mpi.cache.reader import DataSource, open_block_data
from pbkd_mpi.config import DistillConfig
from pbkd_mpi.distill.checkpoint import epoch_checkpoint, load_state, restore
from pbkd_mpi.distill.head_loss import HeadLoss
from pbkd_mpi.model.cost import layers_cost
from pbkd_mpi.model.evaluate import forward_batch
from pbkd_mpi.model.graph import Block
from pbkd_mpi.model.students import build_student_model, layer_weights
from pbkd_mpi.mpi import faults


@dataclass(frozen=True)
class BlockTask:
    block: Block
    cache_path: str
    cache_fingerprint: str
    config: DistillConfig
    seed: int
    estimated_cost: float  # relative units: only the order of tasks depends on it
    depth_multiplier: int = 1
    initial_weights: dict = field(default_factory=dict)  # {student layer name: arrays}
    source: DataSource = field(default_factory=DataSource)  # cache reader or recompute
    # A chained task (chain.py): its inputs come from this HDF5 file (the assembled
    # student's activations), its targets from the cache; the digest keys that file.
    input_path: str = ""
    input_digest: str = ""
    # The last replaced block's chained task: its loss adds distillation through the
    # teacher's head (head_loss.py).
    head_loss: HeadLoss | None = None

    @property
    def block_seed(self) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(self.block.name.encode())) % (2**31)


# One activation element a block reads or writes costs about as much time as 100 FLOPs of
# its student: a least-squares fit of the demo's six block tasks on a 2-core CPU gave, per
# epoch of 7,200 samples, 1.2e-4 s per element of a sample's input and output plus 1.2e-6 s
# per FLOP of a sample's student forward pass. Small blocks are bound by memory traffic.
ELEMENT_COST_IN_FLOPS = 100


def estimate_cost(block: Block, student_flops: int, samples: int, epochs: int) -> float:
    """Estimated relative cost of a block task (only the order of tasks depends on it):
    FLOPs of the student plus the activation elements it reads and writes, weighted."""
    io_elements = int(np.prod(block.input_shape)) + int(np.prod(block.output_shape))
    return float(samples * epochs * (student_flops + ELEMENT_COST_IN_FLOPS * io_elements))


CALIBRATION_SAMPLES = 512


def calibrate_norm(model, x) -> None:
    """Re-express the output BN in the student's own statistics, keeping what it computes.

    The BN starts as the teacher block's BN, whose statistics describe the teacher's conv
    output; the student's separable conv only approximates that output, and in training
    mode BN normalises with the batch's statistics. Rewriting scale and shift around the
    student's measured mean and variance leaves inference unchanged and makes training
    mode compute the same map from the first step.
    """
    import keras

    norm = next(layer for layer in model.layers
                if isinstance(layer, keras.layers.BatchNormalization))
    mean, variance = _channel_moments(keras.Model(model.inputs, norm.input), x)
    gamma, beta, old_mean, old_variance = norm.get_weights()
    old_scale = gamma / np.sqrt(old_variance + norm.epsilon)
    norm.set_weights([
        old_scale * np.sqrt(variance + norm.epsilon),
        beta + old_scale * (mean - old_mean),
        mean,
        variance,
    ])


def _channel_moments(feature, x, batch_size: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of `feature`'s output over `x`, accumulated a batch at
    a time (in float64; batches of at most 64, fewer where forward_batch says): the whole
    output of 512 samples was 134 MB at 64 px, 0.8 GB at 224 px, on top of the batch's
    own activations."""
    batch_size = batch_size or forward_batch(feature, largest=64)
    count, total, squares = 0, 0.0, 0.0
    for start in range(0, len(x), batch_size):
        values = np.asarray(feature.predict_on_batch(x[start:start + batch_size]), np.float64)
        axes = tuple(range(values.ndim - 1))
        count += values.size // values.shape[-1]
        total = total + values.sum(axis=axes)
        squares = squares + np.square(values).sum(axis=axes)
    mean = total / count
    variance = np.maximum(squares / count - np.square(mean), 0.0)
    return mean.astype(np.float32), variance.astype(np.float32)


def train_block(task: BlockTask, callbacks=(), checkpoint_path: Path | None = None) -> dict:
    """Train the task's student block. With `checkpoint_path`, the task's state is saved
    there after every epoch, and a task that finds a checkpoint resumes from it."""
    block = task.block
    with open_block_data(task, task.source, poison=faults.active("nan", block.name)) as data:
        if faults.active("raise", block.name):
            raise faults.InjectedFault(f"fault injected into block {block.name!r} (PBKD_FAULT)")
        return _fit(task, data, callbacks, checkpoint_path)


def _fit(task: BlockTask, data, callbacks, checkpoint_path: Path | None) -> dict:
    import keras

    block = task.block
    keras.utils.set_random_seed(task.block_seed)
    model = build_student_model(block, task.depth_multiplier)
    for layer_name, arrays in task.initial_weights.items():
        model.get_layer(layer_name).set_weights(arrays)
    calibrate_norm(model, data.calibration(CALIBRATION_SAMPLES))
    # Evaluation batches hold the student's activations, like every forward pass: 256
    # samples of a 64 px block whose student was widened 4x held about 0.5 GB.
    data.val.batch_size = data.train_eval.batch_size = forward_batch(model)
    # The loss trained and early-stopped on; the MSE is reported either way.
    model.compile(optimizer=keras.optimizers.Adam(task.config.learning_rate),
                  loss="mse" if task.head_loss is None else task.head_loss.keras_loss(),
                  metrics=[keras.metrics.MeanSquaredError(name="mse")])

    def scores(dataset) -> tuple[float, float]:
        """(loss, MSE) in inference mode (BN moving statistics), as the block will run."""
        values = model.evaluate(dataset, verbose=0, return_dict=True)
        return float(values["loss"]), float(values["mse"])

    best = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=task.config.patience, restore_best_weights=True
    )
    resume = load_state(checkpoint_path) if checkpoint_path is not None else None
    if resume is not None:
        restore(model, resume)
        before = resume.extra
    else:
        # Where training starts from (the teacher's factorised kernel), for the report.
        loss, mse = scores(data.val.dataset())
        before = {"initial_val_mse": mse, "initial_val_loss": loss}
    extra_callbacks = []
    if checkpoint_path is not None:
        progress = epoch_checkpoint(checkpoint_path, best, before, resume)
        extra_callbacks.append(progress)
    started = time.perf_counter()
    first_epoch = resume.epoch + 1 if resume is not None else 0
    history = model.fit(
        data.train_dataset(first_epoch),  # batches of task.config.batch_size, shuffled
        epochs=task.config.epochs,
        initial_epoch=first_epoch,
        validation_data=data.val.dataset(),
        callbacks=[keras.callbacks.TerminateOnNaN(), best, *extra_callbacks, *callbacks],
        shuffle=False,  # the reader shuffles
        verbose=0,
    )
    epochs_history = progress.history if checkpoint_path is not None else history.history
    train_seconds = time.perf_counter() - started
    _, train_mse = scores(data.train_eval.dataset())
    val_loss, val_mse = scores(data.val.dataset())
    if not all(np.isfinite(v) for v in (train_mse, val_mse, val_loss)):
        raise FloatingPointError(
            f"block {block.name!r} ended with a non-finite MSE (train {train_mse}, val {val_mse})"
        )
    params, flops = layers_cost(model.layers[1:])
    return {
        "weights": layer_weights(model),
        "train_mse": train_mse,
        "val_mse": val_mse,
        "initial_val_mse": before["initial_val_mse"],
        # The loss trained on: the MSE, or with a head loss the MSE plus its distillation.
        "val_loss": val_loss,
        "initial_val_loss": before.get("initial_val_loss", before["initial_val_mse"]),
        "resumed_from_epoch": resume.epoch + 1 if resume is not None else 0,
        "target_variance": data.val.target_variance(),
        "epochs": len(epochs_history.get("loss", [])),
        "best_epoch": int(best.best_epoch) + 1,
        "train_seconds": train_seconds,
        "history": {k: [float(v) for v in vals] for k, vals in epochs_history.items()},
        "student_params": params,
        "student_flops": flops,
    }
