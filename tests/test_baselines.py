"""The baselines: whole-model KD that really distils, the budget, and the recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pbkd_mpi.errors import UserError
from pbkd_mpi.finetune.baselines import (METHOD_PHASES, kd_model, method_seconds,
                                         run_baseline, train_within_budget)
from pbkd_mpi.model.evaluate import accuracy
from pbkd_mpi.model.logits import logits_model


def _classifier(seed: int, softmax: bool):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax" if softmax else None)(hidden)
    return keras.Model(inputs, outputs)


def test_whole_model_kd_makes_the_student_agree_with_the_teacher():
    # The Keras pitfall: LogitsDistillation's default loss compares raw logits / T and the
    # student stays at chance (1 in 10 here). The soft targets alone (alpha 1, the labels
    # are noise) must carry the teacher's decisions over.
    teacher = _classifier(0, softmax=True)
    student = _classifier(1, softmax=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 8)).astype("float32") * 3
    noise_labels = rng.integers(0, 10, len(x))
    distiller = kd_model(teacher, student, temperature=4.0, alpha=1.0, rate=3e-3)
    distiller.fit(x, noise_labels, batch_size=64, epochs=15, verbose=0)
    x_new = rng.normal(size=(1000, 8)).astype("float32") * 3
    agreement = np.mean(np.argmax(student.predict(x_new, verbose=0), -1)
                        == np.argmax(teacher.predict(x_new, verbose=0), -1))
    assert agreement > 0.6, agreement


def _report(**phases):
    return {"phases": phases, "cache": {"reused": False},
            "distill": {"reused_blocks": 0}, "finetune": {"reused": False}}


def test_the_budget_is_the_run_after_its_teacher():
    seconds = {name: 10.0 for name in METHOD_PHASES}
    assert method_seconds(_report(load=3.0, teacher=100.0, evaluate=5.0, deploy=7.0,
                                  **seconds)) == 10.0 * len(METHOD_PHASES)
    # A run without a chained pass has no "chain" phase.
    del seconds["chain"]
    assert method_seconds(_report(**seconds)) == 10.0 * (len(METHOD_PHASES) - 1)


def test_a_run_that_reused_earlier_work_is_refused_without_a_budget():
    report = _report(distill=1.0)
    report["cache"]["reused"] = True
    report["distill"]["reused_blocks"] = 3
    with pytest.raises(UserError, match=r"reused the activation cache, 3 block\(s\).*"
                                        r"--budget-s"):
        method_seconds(report)


def test_a_baseline_keeps_its_best_epoch_within_its_budget(tiny_dataset, tiny_teacher):
    import keras

    reads = tiny_dataset.test_reads
    lines = []
    result = run_baseline("scratch", tiny_teacher, tiny_teacher, tiny_dataset, 3.0,
                          batch_size=32, rate=1e-3, temperature=4.0, alpha=0.7, seed=0,
                          log=lines.append)
    assert result["method"] == "scratch" and result["epochs"] == len(result["curve"]) >= 1
    assert len(lines) == result["epochs"]
    values = [val for _, val in result["curve"]]
    assert result["val_accuracy"] == max(values)
    assert result["best_epoch"] == values.index(max(values)) + 1
    rates = result["learning_rates"]
    assert rates[0] == 1e-3 and all(a >= b for a, b in zip(rates, rates[1:]))
    # A second epoch starts only when the epochs so far say it fits.
    if result["epochs"] > 1:
        assert result["curve"][-2][0] < 3.0
    assert tiny_dataset.test_reads == reads + 1  # the test split, once, at the end
    assert 0.0 <= result["test_accuracy"] <= 1.0

    # The best epoch's weights are the ones kept: scoring again gives its accuracy.
    student = keras.models.clone_model(tiny_teacher)
    model = logits_model(student)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kept = train_within_budget(model, model, tiny_dataset, 2.0, 32, 1e-3, 0,
                               log=lambda _: None)
    assert accuracy(model, tiny_dataset.x_val, tiny_dataset.y_val) == kept["val_accuracy"]


def test_the_learning_rate_never_rises_when_more_epochs_fit(tiny_dataset, tiny_teacher):
    """The first epoch traces the graph (10 s on this clock), the next takes 1 s: the
    estimate grows from 10 to 91 epochs, and a cosine over 91 would start high again."""
    import keras

    ticks = iter([0, 0, 10, 10, 10, 11, 11, 11, 12, 100, 100])
    model = logits_model(keras.models.clone_model(tiny_teacher))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    result = train_within_budget(model, model, tiny_dataset, 100.0, 32, 1e-3, 0,
                                 log=lambda _: None, clock=lambda: next(ticks))
    second = 1e-3 * 0.5 * (1 + math.cos(math.pi / 10))  # epoch 2 of the 10 planned then
    assert result["epochs"] == 3
    assert result["learning_rates"] == pytest.approx([1e-3, second, second])
