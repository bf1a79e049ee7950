"""Fine-tuning in one process (a communicator of size 1): distillation from logits, the
learning-rate schedule, best-weights selection on validation and the divergence guard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mpi4py import MPI

from pbkd_mpi.config import FinetuneConfig
from pbkd_mpi.finetune.train import FinetuneData, finetune, learning_rate
from pbkd_mpi.model.logits import logit_boundary, logits_from_boundary, logits_model


@pytest.fixture(scope="module")
def trained(tiny_dataset, tiny_teacher):
    """The tiny teacher after a little training, and its logits."""
    import keras

    from pbkd_mpi.model.teacher import fit_classifier

    teacher = keras.models.clone_model(tiny_teacher)
    teacher.set_weights(tiny_teacher.get_weights())
    fit_classifier(teacher, tiny_dataset, epochs=3, batch_size=32, learning_rate=3e-3,
                   patience=3, probabilities=True, seed=0)
    cut = keras.Model(teacher.inputs, teacher.get_layer(logit_boundary(teacher)).output)
    logits = tuple(logits_from_boundary(teacher, cut.predict(x, verbose=0))
                   for x in (tiny_dataset.x_train, tiny_dataset.x_val))
    return teacher, logits


def test_teacher_logits_are_read_from_the_cache_by_rows(trained, tiny_dataset, tmp_path):
    """Fine-tuning reads the logits a batch of rows at a time (any order), never whole,
    and they equal the logits computed from the whole boundary array."""
    import h5py
    import keras

    from pbkd_mpi.finetune.stage import CachedLogits, teacher_logits

    teacher, (train_logits, val_logits) = trained
    name = logit_boundary(teacher)
    cut = keras.Model(teacher.inputs, teacher.get_layer(name).output)
    path, fingerprint = tmp_path / "cache.h5", "f" * 16
    with h5py.File(path, "w") as f:  # a complete stitched cache without shards
        f.attrs.update(fingerprint=fingerprint, complete=True, shards="[]")
        for split, x in (("train", tiny_dataset.x_train), ("val", tiny_dataset.x_val)):
            f.create_group(split).create_dataset(name, data=cut.predict(x, verbose=0))
    with teacher_logits(teacher, tiny_dataset, str(path), fingerprint) as (train, val):
        assert isinstance(train, CachedLogits) and len(val) == len(val_logits)
        rows = np.array([17, 3, 250, 4, 0])
        np.testing.assert_allclose(train[rows], train_logits[rows], atol=1e-5)
        np.testing.assert_allclose(val[np.arange(len(val))], val_logits, atol=1e-5)
        assert train[np.array([], np.int64)].shape == (0, train_logits.shape[1])


def _student(teacher):
    import keras

    keras.utils.set_random_seed(3)
    student = keras.models.clone_model(teacher)  # fresh weights: the teacher's shape
    return student


def test_logits_are_the_pre_softmax_tensor(trained, tiny_dataset):
    import keras

    teacher, (train_logits, _) = trained
    assert logit_boundary(teacher) == "gap"  # the built-in teacher ends in Dense(softmax)
    probabilities = teacher.predict(tiny_dataset.x_train, verbose=0)
    np.testing.assert_allclose(np.asarray(keras.ops.softmax(train_logits)), probabilities,
                               atol=1e-5)
    shared = logits_model(teacher)
    assert len(shared.trainable_variables) == len(teacher.trainable_variables)
    np.testing.assert_allclose(shared.predict(tiny_dataset.x_train[:8], verbose=0),
                               train_logits[:8], atol=1e-4)


def test_distillation_fine_tuning_keeps_the_best_validation_epoch(trained, tiny_dataset):
    teacher, logits = trained
    student = _student(teacher)
    config = FinetuneConfig(epochs=4, batch_size=32, learning_rate=3e-3, patience=4)
    summary = finetune(student, FinetuneData.of(tiny_dataset, logits), config,
                       MPI.COMM_SELF, seed=0)
    history = summary["history"]
    assert summary["epochs"] == len(history["val_accuracy"]) == 4
    assert summary["val_accuracy"] == max([summary["val_accuracy_before"],
                                           *history["val_accuracy"]])
    assert history["learning_rate"][0] == pytest.approx(3e-3)
    assert history["learning_rate"][-1] < history["learning_rate"][0]  # cosine decays
    assert history["loss"][-1] < history["loss"][0]
    # The student left in place is the best epoch's: its validation accuracy is the summary's.
    predictions = np.argmax(student.predict(tiny_dataset.x_val, verbose=0), axis=-1)
    assert np.mean(predictions == tiny_dataset.y_val) == pytest.approx(summary["val_accuracy"])
    assert summary["recoveries"] == []


def test_divergence_guard_restores_and_lowers_the_rate(trained, tiny_dataset):
    teacher, logits = trained
    import keras

    student = keras.models.clone_model(teacher)  # the trained weights: a start to collapse from
    student.set_weights(teacher.get_weights())
    config = FinetuneConfig(epochs=3, batch_size=32, learning_rate=1e4, patience=5,
                            schedule="constant", collapse_drop=0.05, max_recoveries=1)
    summary = finetune(student, FinetuneData.of(tiny_dataset, logits), config,
                       MPI.COMM_SELF, seed=0)
    assert summary["recoveries"], summary["history"]
    first = summary["recoveries"][0]
    assert first["learning_rate_scale"] == pytest.approx(0.3)
    assert all(np.isfinite(w).all() for w in student.get_weights())
    predictions = np.argmax(student.predict(tiny_dataset.x_val, verbose=0), axis=-1)
    assert np.mean(predictions == tiny_dataset.y_val) == pytest.approx(summary["val_accuracy"])
    assert summary["val_accuracy"] >= summary["val_accuracy_before"]


def test_cosine_schedule_values():
    config = FinetuneConfig(epochs=4, learning_rate=1.0)
    assert [learning_rate(config, e) for e in (1, 3)] == pytest.approx([1.0, 0.5])
    assert learning_rate(dataclasses.replace(config, schedule="constant"), 4) == 1.0


def test_a_finished_fine_tuning_is_kept_under_a_key_of_what_it_depends_on(
        trained, tiny_dataset, tmp_path):
    from pbkd_mpi.keys import finetune_key
    from pbkd_mpi.finetune.stage import load_finetuned, save_finetuned

    teacher, _ = trained
    student = _student(teacher)
    config = FinetuneConfig(epochs=2)
    key = finetune_key(student, config, "data", "teacher", 0, 3)
    changed = _student(teacher)
    changed.layers[-1].set_weights([w + 1 for w in changed.layers[-1].get_weights()])
    assert len({key, finetune_key(changed, config, "data", "teacher", 0, 3),
                finetune_key(student, dataclasses.replace(config, epochs=3), "data",
                             "teacher", 0, 3),
                finetune_key(student, config, "other", "teacher", 0, 3),
                finetune_key(student, config, "data", "other", 0, 3),
                finetune_key(student, config, "data", "teacher", 1, 3),
                finetune_key(student, config, "data", "teacher", 0, 2)}) == 7

    assert load_finetuned(tmp_path, key, student) is None  # nothing saved yet
    save_finetuned(tmp_path, key, changed, {"epochs": 2, "val_accuracy": 0.5})
    summary = load_finetuned(tmp_path, key, student)
    assert summary == {"epochs": 2, "val_accuracy": 0.5}
    for a, b in zip(student.get_weights(), changed.get_weights()):
        np.testing.assert_array_equal(a, b)
    # A summary whose model file is gone or damaged is not a result: fine-tune again.
    (tmp_path / "finetune" / f"student-{key}.keras").write_bytes(b"not a zip")
    assert load_finetuned(tmp_path, key, _student(teacher)) is None
