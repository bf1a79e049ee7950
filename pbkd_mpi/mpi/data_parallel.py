"""Data-parallel training of one Keras model over an mpi4py communicator.

Every rank holds the same model. Each step, the global batch (the same shuffled indices on
every rank, drawn from a seed shared by all) is split into one disjoint piece per rank; each
rank computes the gradient of its piece, the gradients are averaged with
`collectives.allreduce_mean` (non-blocking, polled, so no rank spins a core while it waits)
and every rank applies the same average with the same optimizer. Weights therefore stay
identical without ever being sent again. With a communicator of size 1 this is plain
mini-batch training with the same global batch.

The loss is the caller's: `loss_fn(outputs, targets)` returns the batch mean as a scalar
tensor, where `outputs = model(x, training=True)` and `targets` is the tuple of target
arrays at the batch's indices (labels and teacher logits for fine-tuning, a block's output
activation for MSE block training). Each rank's gradient is weighted by its share of the
global batch, so the average is exactly the gradient of the whole global batch, also for the
last, short batch of an epoch.

BatchNormalization: each rank normalises with the statistics of its own piece of the batch
(no synchronised BN, which would need a collective inside every BN layer's forward pass),
and its moving mean and variance follow its own pieces. `sync_non_trainable` averages every
floating-point non-trainable variable (the BN moving statistics) across ranks; `fit` calls it
at the end of each epoch, so the model every rank evaluates or saves is the same one.

Inputs and targets can be NumPy arrays or h5py datasets: each rank reads only its piece of
each batch, with sorted indices (what h5py needs; the order inside a batch does not change
a mean loss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from pbkd_mpi.mpi.collectives import (Check, STEP_POLL_CAP_S, allreduce_mean, allreduce_sum,
                                      broadcast_arrays)


@dataclass(frozen=True)
class EpochStats:
    epoch: int          # counted from 1
    loss: float         # mean training loss over the epoch's samples, all ranks together
    seconds: float      # wall time of the epoch on this rank (synchronous, so about equal)
    steps: int
    local_samples: int  # samples this rank computed gradients for


def batch_pieces(order: np.ndarray, step: int, batch_size: int, size: int) -> list[np.ndarray]:
    """The pieces of global batch `step` of the permutation `order`, one per rank, sorted.
    The last batch of an epoch may be short; a rank may then get an empty piece."""
    batch = order[step * batch_size:(step + 1) * batch_size]
    return [np.sort(piece) for piece in np.array_split(batch, size)]


def shard(n: int, rank: int, size: int) -> np.ndarray:
    """Contiguous indices of `rank`'s share of n samples (for evaluation)."""
    return np.array_split(np.arange(n), size)[rank]


class DataParallelTrainer:
    """One model, one optimizer, one communicator: epochs of synchronous data-parallel SGD.

    `check` is passed to every collective (rank 0: raise if a worker failed; workers: raise
    if rank 0 asked to abort), so no rank waits forever for one that is gone."""

    def __init__(self, model, loss_fn: Callable, optimizer, comm, *, batch_size: int,
                 seed: int = 0, check: Check = None):
        import tensorflow as tf

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.loss_fn, self.comm = model, loss_fn, comm
        self.batch_size, self.seed, self.check = batch_size, seed, check
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        variables = model.trainable_variables

        # One traced function per input shape family; reduce_retracing keeps the short last
        # batch from tracing a new graph every epoch.
        @tf.function(reduce_retracing=True)
        def gradients(x, targets):
            with tf.GradientTape() as tape:
                loss = loss_fn(model(x, training=True), targets)
            return loss, tape.gradient(loss, variables)

        self._gradients = gradients
        self._variables = variables
        self.use_optimizer(optimizer)
        self.broadcast_weights()

    def use_optimizer(self, optimizer) -> None:
        """Apply the averaged gradients with `optimizer` from now on (a fresh one restarts
        Adam's moments)."""
        import tensorflow as tf

        optimizer.build(self._variables)
        variables = self._variables

        # Eager, Adam's update is a few Python-dispatched ops per variable: 87% of a step
        # of the tiny job's student (measured). Traced, it is one graph call per step.
        @tf.function
        def apply(grads):
            optimizer.apply(grads, variables)

        self.optimizer, self._apply = optimizer, apply

    # -- keeping ranks identical -------------------------------------------------------
    def broadcast_weights(self, root: int = 0) -> None:
        """Every rank takes `root`'s weights (trainable and not)."""
        if self.size == 1:
            return
        self.model.set_weights(
            broadcast_arrays(self.comm, self.model.get_weights(), root, self.check))

    def sync_non_trainable(self) -> None:
        """Average the floating-point non-trainable variables (BN moving statistics)."""
        if self.size == 1:
            return
        variables = [v for v in self.model.non_trainable_variables
                     if np.dtype(v.dtype).kind == "f"]
        if not variables:
            return
        means = allreduce_mean(self.comm, [np.asarray(v.numpy()) for v in variables],
                               self.check)
        for variable, mean in zip(variables, means):
            variable.assign(mean.astype(np.dtype(variable.dtype), copy=False))

    # -- training ----------------------------------------------------------------------
    def epoch_order(self, n: int, epoch: int) -> np.ndarray:
        """The same permutation on every rank: it depends only on the seed and the epoch."""
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def train_epoch(self, x, targets: Sequence, epoch: int) -> EpochStats:
        """One pass over the n samples of `x` (each rank its pieces). `epoch` counts from 1
        and chooses the shuffle."""
        import tensorflow as tf

        started = time.perf_counter()
        n = len(x)
        order = self.epoch_order(n, epoch)
        steps = -(-n // self.batch_size)
        loss_sum, local_samples = 0.0, 0
        for step in range(steps):
            pieces = batch_pieces(order, step, self.batch_size, self.size)
            mine = pieces[self.rank]
            global_count = sum(len(p) for p in pieces)
            if len(mine):
                xb = tf.convert_to_tensor(np.asarray(x[mine]))
                tb = tuple(tf.convert_to_tensor(np.asarray(t[mine])) for t in targets)
                loss, grads = self._gradients(xb, tb)
                loss = float(loss)
                grads = [np.zeros(v.shape, np.float32) if g is None else
                         np.asarray(tf.convert_to_tensor(g)) for g, v in
                         zip(grads, self._variables)]
            else:  # a short last batch left this rank nothing: it adds zero
                loss, grads = 0.0, [np.zeros(v.shape, np.float32) for v in self._variables]
            # Weight by this rank's share, so the mean over ranks is the global batch's
            # mean gradient; the loss sum travels in the same collective.
            weight = len(mine) * self.size / global_count
            averaged = [g * weight for g in grads] + \
                [np.array([loss * len(mine) * self.size], np.float64)]
            if self.size > 1:
                averaged = allreduce_mean(self.comm, averaged, self.check, STEP_POLL_CAP_S)
            loss_sum += float(averaged[-1][0])
            self._apply([tf.convert_to_tensor(g.astype(np.float32, copy=False))
                         for g in averaged[:-1]])
            local_samples += len(mine)
        return EpochStats(epoch, loss_sum / n, time.perf_counter() - started, steps,
                          local_samples)

    # -- evaluation --------------------------------------------------------------------
    def evaluate_sums(self, fn: Callable, arrays: Sequence, batch_size: int = 256
                      ) -> list[float]:
        """Sums over all samples, each rank computing its contiguous shard:
        `fn(model, *batch_arrays)` returns a list of per-batch sums (e.g. correct
        predictions, squared errors); the totals come back identical on every rank."""
        n = len(arrays[0])
        mine = shard(n, self.rank, self.size)
        totals = None
        for start in range(0, len(mine), batch_size):
            index = mine[start:start + batch_size]
            sums = [float(s) for s in fn(self.model, *(np.asarray(a[index]) for a in arrays))]
            totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
        if totals is None:  # this rank's shard is empty: learn how many sums fn gives
            totals = [0.0 * float(s) for s in
                      fn(self.model, *(np.asarray(a[:1]) for a in arrays))]
        return [float(t[0]) for t in
                allreduce_sum(self.comm, [np.array([t]) for t in totals], self.check)]


def sparse_accuracy_sums(model, x, y) -> list[float]:
    """For `evaluate_sums`: [correct predictions, samples] of a classifier."""
    predictions = np.asarray(model(x, training=False))
    return [float(np.sum(np.argmax(predictions, axis=-1) == y)), float(len(y))]


def fit(model, x, targets: Sequence, loss_fn: Callable, optimizer, comm, *, epochs: int,
        batch_size: int, seed: int = 0, check: Check = None,
        on_epoch_end: Callable[[DataParallelTrainer, EpochStats], bool] | None = None
        ) -> list[EpochStats]:
    """Train `model` on (x, targets) for up to `epochs` epochs on every rank of `comm`.

    `batch_size` is the global batch (all ranks together), so the result does not depend on
    the number of ranks beyond round-off and BN's per-rank batch statistics. After each
    epoch the BN moving statistics are averaged and `on_epoch_end(trainer, stats)` runs on
    every rank; it returns True to stop (it must decide the same on every rank: base the
    decision on values from `trainer.evaluate_sums`, which are identical everywhere)."""
    trainer = DataParallelTrainer(model, loss_fn, optimizer, comm, batch_size=batch_size,
                                  seed=seed, check=check)
    history = []
    for epoch in range(1, epochs + 1):
        stats = trainer.train_epoch(x, targets, epoch)
        trainer.sync_non_trainable()
        history.append(stats)
        if on_epoch_end is not None and on_epoch_end(trainer, stats):
            break
    return history
