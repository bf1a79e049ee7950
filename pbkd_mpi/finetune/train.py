"""End-to-end fine-tuning of the assembled student, data-parallel on the ranks of a
communicator (finetune/stage.py picks them), selected on validation only.

Every rank holds the student and a disjoint piece of each batch (mpi/data_parallel.py); the
loss is cross-entropy on labels or Hinton distillation on the teacher's soft targets, whose
logits come from the activation cache (model/logits.py). After each epoch the ranks score the
validation split together (each its shard, sums allreduced), so every rank takes the same
decisions:

- the learning rate follows the schedule (cosine or constant) times the guard's scale;
- a better validation accuracy saves the weights as the best; `patience` epochs without one
  stop the run; at the end the best weights are restored, and the assembled student before
  any fine-tuning competes too (fine-tuning that does not help on validation is not kept);
- divergence guard: a NaN/Inf training loss, or a validation accuracy more than
  `collapse_drop` below the best, restores the best weights, scales the learning rate by
  0.3 with a fresh optimizer state, and goes on; each recovery is in the summary (and the
  report). After `max_recoveries` it stops at the best weights.

The test split is never read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pbkd_mpi.config import FinetuneConfig
from pbkd_mpi.data.dataset import Dataset
from pbkd_mpi.model.evaluate import forward_batch
from pbkd_mpi.model.logits import logits_model
from pbkd_mpi.mpi.data_parallel import DataParallelTrainer, sparse_accuracy_sums

GUARD_LR_FACTOR = 0.3


@dataclass(frozen=True)
class FinetuneData:
    """What each rank trains on: images, labels and (distill loss) the teacher's logits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    # The teacher's logits: arrays, or read by rows (finetune/stage.CachedLogits).
    teacher_train: np.ndarray | None = None
    teacher_val: np.ndarray | None = None

    @classmethod
    def of(cls, dataset: Dataset, teacher_logits: tuple | None = None) -> "FinetuneData":
        train, val = teacher_logits if teacher_logits is not None else (None, None)
        return cls(dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val, train, val)


def make_loss(config: FinetuneConfig):
    """loss_fn(student_logits, targets) for data_parallel: targets are (labels,) or
    (labels, teacher_logits)."""
    import keras
    from keras import ops

    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if config.loss == "cross-entropy":
        return lambda logits, targets: cross_entropy(targets[0], logits)
    t, alpha = config.temperature, config.alpha

    def distill(logits, targets):
        labels, teacher = targets
        soft = ops.softmax(ops.cast(teacher, "float32") / t, axis=-1)
        log_student = ops.log_softmax(logits / t, axis=-1)
        # KL(teacher || student) = sum p log p - sum p log q; the first term has no
        # gradient but keeps the loss at 0 for a perfect match. T^2 keeps the gradient
        # scale independent of T (Hinton et al.).
        kl = ops.sum(soft * (ops.log(ops.maximum(soft, 1e-12)) - log_student), axis=-1)
        return alpha * t * t * ops.mean(kl) + (1.0 - alpha) * cross_entropy(labels, logits)

    return distill


def learning_rate(config: FinetuneConfig, epoch: int) -> float:
    """The schedule's rate for `epoch` (from 1), before the divergence guard's scale."""
    if config.schedule == "constant" or config.epochs <= 1:
        return config.learning_rate
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / config.epochs))


def finetune(student, data: FinetuneData, config: FinetuneConfig, comm, seed: int,
             check=None, callbacks=()) -> dict:
    """Fine-tune `student` in place on every rank of `comm` (call it on all of them with
    the same arguments except each rank's `callbacks`, Keras callbacks driven per epoch).
    Returns the summary (identical on every rank but for times)."""
    import keras


    if config.loss == "distill" and data.teacher_train is None and config.epochs > 0:
        raise ValueError("finetune.loss = 'distill' needs the teacher's logits; received none")
    keras.utils.set_random_seed(seed)
    model = logits_model(student)  # shares the student's variables, outputs logits
    targets = (data.y_train,) if config.loss == "cross-entropy" else \
        (data.y_train, data.teacher_train)
    trainer = DataParallelTrainer(model, make_loss(config),
                                  keras.optimizers.Adam(config.learning_rate), comm,
                                  batch_size=config.batch_size, seed=seed, check=check)

    # Batches of 256 held 1 GB at 64 px (an eager call keeps every layer's output).
    evaluation_batch = forward_batch(model)

    def val_accuracy() -> float:
        correct, count = trainer.evaluate_sums(sparse_accuracy_sums, [data.x_val, data.y_val],
                                               evaluation_batch)
        return correct / max(count, 1.0)

    start = val_accuracy()
    summary = {"epochs": 0, "best_epoch": 0, "val_accuracy_before": start,
               "val_accuracy": start, "ranks": comm.Get_size(), "loss": config.loss,
               "history": {"loss": [], "val_accuracy": [], "learning_rate": []},
               "epoch_seconds": [], "recoveries": []}
    if config.epochs == 0:
        return summary
    best_val, best_weights, best_epoch = start, model.get_weights(), 0
    scale, since_best = 1.0, 0
    for cb in callbacks:
        cb.set_model(student)
        cb.on_train_begin()
    for epoch in range(1, config.epochs + 1):
        rate = learning_rate(config, epoch) * scale
        trainer.optimizer.learning_rate.assign(rate)
        for cb in callbacks:
            cb.on_epoch_begin(epoch - 1)
        stats = trainer.train_epoch(data.x_train, targets, epoch)
        trainer.sync_non_trainable()
        val = val_accuracy()
        summary["epochs"] = epoch
        for key, value in (("loss", stats.loss), ("val_accuracy", val),
                           ("learning_rate", rate)):
            summary["history"][key].append(float(value))
        summary["epoch_seconds"].append(stats.seconds)
        for cb in callbacks:
            cb.on_epoch_end(epoch - 1, {"loss": stats.loss, "val_accuracy": val,
                                        "learning_rate": rate})
        if not math.isfinite(stats.loss) or val < best_val - config.collapse_drop:
            reason = (f"loss {stats.loss}" if not math.isfinite(stats.loss) else
                      f"validation accuracy {val:.4f}, best {best_val:.4f}")
            model.set_weights(best_weights)
            scale *= GUARD_LR_FACTOR
            # Adam's moments may hold the blow-up: start them again.
            trainer.use_optimizer(keras.optimizers.Adam(rate * GUARD_LR_FACTOR))
            summary["recoveries"].append({"epoch": epoch, "reason": reason,
                                          "restored_epoch": best_epoch,
                                          "learning_rate_scale": scale})
            if len(summary["recoveries"]) > config.max_recoveries:
                break
            since_best += 1
            continue
        if val > best_val:
            best_val, best_weights, best_epoch, since_best = val, model.get_weights(), epoch, 0
        else:
            since_best += 1
        if since_best >= config.patience:
            break
    for cb in callbacks:
        cb.on_train_end()
    model.set_weights(best_weights)
    summary["best_epoch"] = best_epoch
    summary["val_accuracy"] = best_val
    return summary
