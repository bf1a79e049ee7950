"""End-to-end fine-tuning of the assembled student with labels, selected on validation.

Runs on rank 0. The weights kept are those of the epoch with the best validation accuracy,
and the assembled student before any fine-tuning competes too: fine-tuning that does not
help on validation data is not kept.
"""

from __future__ import annotations

import numpy as np

from .config import FinetuneConfig
from .data import Dataset


def accuracy(model, x, y, batch_size: int = 256) -> float:
    predictions = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(predictions, axis=-1) == y))


def fit_classifier(model, dataset: Dataset, *, epochs: int, batch_size: int,
                   learning_rate: float, patience: int, probabilities: bool, seed: int,
                   callbacks=()):
    """Train with labels (Adam, cross-entropy), keeping the weights of the epoch with the
    best validation accuracy. Returns (Keras history, best epoch counted from 1)."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities),
        metrics=["accuracy"],
    )
    best = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True
    )
    history = model.fit(
        dataset.x_train,
        dataset.y_train,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=(dataset.x_val, dataset.y_val),
        callbacks=[best, *callbacks],
        shuffle=True,
        verbose=0,
    )
    return history, int(best.best_epoch) + 1


def finetune(student, dataset: Dataset, config: FinetuneConfig, probabilities: bool,
             seed: int, callbacks=()) -> dict:
    start_val_accuracy = accuracy(student, dataset.x_val, dataset.y_val)
    summary = {"epochs": 0, "best_epoch": 0, "val_accuracy_before": start_val_accuracy,
               "val_accuracy": start_val_accuracy, "history": {}}
    if config.epochs == 0:
        return summary
    before = student.get_weights()
    history, best_epoch = fit_classifier(
        student, dataset, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, patience=config.patience,
        probabilities=probabilities, seed=seed, callbacks=callbacks,
    )
    summary["epochs"] = len(history.history["loss"])
    summary["history"] = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    best_val = float(max(history.history["val_accuracy"]))
    if best_val < start_val_accuracy:
        student.set_weights(before)  # fine-tuning made validation accuracy worse
    else:
        summary["best_epoch"] = best_epoch
        summary["val_accuracy"] = best_val
    return summary
