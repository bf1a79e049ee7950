"""A block task trained by k workers together: data-parallel MSE training of one student.

Every worker of the split task runs `train_split_part` with the sub-communicator of the k
ranks (mpi/protocol.Worker makes it). The student starts the same on every rank (same seed,
same teacher-factorised start, same BN calibration batch), each step's global batch of
`distill.batch_size` is cut into k disjoint pieces and the gradients are averaged with a
polled allreduce (mpi/data_parallel.py), so the weights stay identical and the block learns
what it would alone, up to BN's per-piece batch statistics and round-off. Early stopping
uses the validation MSE summed over the ranks' shards (the same number everywhere, so
every rank stops at the same epoch). A split task is not checkpointed per epoch.
"""

from __future__ import annotations

import time

import numpy as np

from pbkd_mpi.cache.reader import open_block_data
from pbkd_mpi.distill.train_block import CALIBRATION_SAMPLES, calibrate_norm
from pbkd_mpi.model.cost import layers_cost
from pbkd_mpi.model.students import build_student_model, layer_weights
from pbkd_mpi.mpi import data_parallel
from pbkd_mpi.output.logs import LOGGER


def _pairs(source) -> tuple[np.ndarray, np.ndarray]:
    """All of a PairSource's pairs, in order, in memory (each rank indexes its pieces)."""
    xs, ys = zip(*source.epoch_batches(0))
    return np.concatenate(xs), np.concatenate(ys)


def train_split_part(part, check=None) -> dict:
    """This rank's part of a split block task (`part.task`, a BlockTask, with
    `part.comm`). Returns train_block's result dict, identical on every rank."""
    import keras
    import tensorflow as tf


    task, comm = part.task, part.comm
    block, config = task.block, task.config
    with open_block_data(task, task.source) as data:
        (x_train, y_train), (x_val, y_val) = _pairs(data.train_eval), _pairs(data.val)
        calibration = data.calibration(CALIBRATION_SAMPLES)  # the same on every rank

    keras.utils.set_random_seed(task.block_seed)
    model = build_student_model(block, task.depth_multiplier)
    for layer_name, arrays in task.initial_weights.items():
        model.get_layer(layer_name).set_weights(arrays)
    calibrate_norm(model, calibration)

    def loss_fn(outputs, targets):
        return tf.reduce_mean(tf.square(outputs - targets[0]))

    def squared_errors(m, x, y):
        error = np.asarray(m(x, training=False)) - y
        return [float(np.sum(error.astype(np.float64) ** 2)), float(error.size)]

    def mse(trainer, x, y):
        total, count = trainer.evaluate_sums(squared_errors, [x, y])
        return total / count

    history = {"loss": [], "val_loss": []}
    best = {"val": np.inf, "epoch": 0, "weights": None}

    def on_epoch_end(trainer, stats):
        val = mse(trainer, x_val, y_val)
        history["loss"].append(stats.loss)
        history["val_loss"].append(val)
        LOGGER.info("task %s (split, rank %d of %d): epoch %d, loss %.4g, val MSE %.4g",
                    block.name, comm.Get_rank(), comm.Get_size(), stats.epoch, stats.loss, val)
        if val < best["val"]:
            best.update(val=val, epoch=stats.epoch, weights=model.get_weights())
        elif stats.epoch - best["epoch"] >= config.patience:
            return True  # the same decision on every rank: val is identical everywhere
        if not np.isfinite(stats.loss):
            raise FloatingPointError(f"block {block.name!r}: the loss became {stats.loss}")
        return False

    # The MSE before training, with the shard-summed evaluation every rank agrees on.
    probe = data_parallel.DataParallelTrainer(model, loss_fn, keras.optimizers.Adam(),
                                              comm, batch_size=config.batch_size,
                                              seed=task.block_seed, check=check)
    initial = mse(probe, x_val, y_val)
    started = time.perf_counter()
    data_parallel.fit(model, x_train, (y_train,), loss_fn,
                      keras.optimizers.Adam(config.learning_rate), comm,
                      epochs=config.epochs, batch_size=config.batch_size,
                      seed=task.block_seed, check=check, on_epoch_end=on_epoch_end)
    train_seconds = time.perf_counter() - started
    if best["weights"] is not None:
        model.set_weights(best["weights"])
    train_mse, val_mse = mse(probe, x_train, y_train), mse(probe, x_val, y_val)
    if not np.isfinite(train_mse) or not np.isfinite(val_mse):
        raise FloatingPointError(
            f"block {block.name!r} ended with a non-finite MSE (train {train_mse}, val {val_mse})")
    params, flops = layers_cost(model.layers[1:])
    return {
        "weights": layer_weights(model),
        "train_mse": train_mse,
        "val_mse": val_mse,
        "initial_val_mse": initial,
        "resumed_from_epoch": 0,
        "target_variance": float(np.var(y_val.astype(np.float64))),
        "epochs": len(history["loss"]),
        "best_epoch": best["epoch"],
        "train_seconds": train_seconds,
        "history": history,
        "student_params": params,
        "student_flops": flops,
        "split_ranks": comm.Get_size(),
    }
