"""Scoring a model: accuracy, and BN statistics re-estimated for a stitched student.

Keras is imported where it is used; see docs/architecture.md (imports).
"""

from __future__ import annotations

import numpy as np

from pbkd_mpi.data.images import image_batches, sample_batches
from pbkd_mpi.model.cost import activation_bytes
from pbkd_mpi.model.teacher import load_model_file


# Activations one forward batch may hold: a fixed batch of 256 held 0.1 GB at 32 px and
# 14 GB for a ResNet50 stem at 224 px (an eager call keeps every layer's output).
FORWARD_BYTES = 256 << 20


def forward_batch(model, largest: int = 256) -> int:
    """Samples per forward pass of `model`: `largest`, or fewer where one sample's
    activations (model/cost.activation_bytes) would take the batch past FORWARD_BYTES."""
    return int(max(1, min(largest, FORWARD_BYTES // max(1, activation_bytes(model)))))


def predict_batches(model, x, batch_size: int | None = None) -> np.ndarray:
    """`model`'s outputs on every image of `x`, read and computed a batch at a time."""
    outputs = [np.asarray(model.predict_on_batch(batch))
               for batch in image_batches(x, batch_size or forward_batch(model))]
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def accuracy(model, x, y, batch_size: int | None = None) -> float:
    predictions = predict_batches(model, x, batch_size)
    return float(np.mean(np.argmax(predictions, axis=-1) == y))


def recalibrated_accuracy(model, x, y, x_calibrate=None, **recalibration) -> float:
    """`model`'s accuracy on (x, y), its BN statistics first re-estimated on the training
    images `x_calibrate` when given (`recalibrate_batchnorm`), as an assembled student's
    are, so that scores of stitched models compare with each other. Changes `model`."""
    if x_calibrate is not None:
        recalibrate_batchnorm(model, x_calibrate, **recalibration)
    return accuracy(model, x, y)


def recalibrate_batchnorm(model, x, batch_size: int = 200, samples: int = 4000,
                          seed: int = 0) -> int:
    """Re-estimate every BatchNormalization layer's moving mean and variance from the
    model's own activations on a seeded random sample of `samples` training images
    (data/images.sample_batches: every batch a mix of the classes); no weight is trained.

    Each student block's BN statistics were learned on the teacher's activations; stitched
    together, every block sees its predecessors' slightly different outputs, and the error
    compounds through stale statistics (on the demo: validation accuracy 0.37 stitched,
    0.58 after this pass). The statistics become the plain average over the batches
    (momentum n / (n + 1) for batch n). Returns how many BN layers were updated."""
    import keras

    layers = [layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    try:
        for n, batch in enumerate(sample_batches(x, min(batch_size, forward_batch(model)),
                                                 samples, seed)):
            for layer in layers:
                layer.momentum = n / (n + 1)
            model(batch, training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return len(layers)


def test_accuracies(teacher, merged_path, student, dataset) -> dict:
    """The one read of the test split: every choice before this used validation data.
    Test accuracies of the teacher, the merged student (from `merged_path`, as assembled)
    and the fine-tuned `student`, and the teacher's validation accuracy beside them
    (`validation_warning`)."""
    if dataset.test_reads:
        raise RuntimeError(f"the test split was read {dataset.test_reads} time(s) before "
                           f"the final evaluation; expected 0")
    x_test, y_test = dataset.test_split()
    return {"teacher": accuracy(teacher, x_test, y_test),
            "teacher_val": accuracy(teacher, dataset.x_val, dataset.y_val),
            "merged": accuracy(load_model_file(str(merged_path)), x_test, y_test),
            "finetuned": accuracy(student, x_test, y_test)}


# How far the teacher's validation accuracy may exceed its test accuracy before validation
# looks like data it learned from: this many points, plus twice the standard error of the
# difference of the two measured shares (small splits differ by chance).
VALIDATION_GAP = 0.03


def validation_warning(accuracies: dict, dataset, teacher_trained_here: bool) -> str | None:
    """A warning when the teacher scores well above its test accuracy on validation data
    carved out of the training split of a teacher the user trained (on that split): every
    early stop, acceptance and choice then favours copying what the teacher memorised."""
    val, test = accuracies["teacher_val"], accuracies["teacher"]
    n_val, n_test = len(dataset.y_val), len(dataset.uncounted("y_test"))
    noise = 2 * np.sqrt(val * (1 - val) / max(n_val, 1) + test * (1 - test) / max(n_test, 1))
    if teacher_trained_here or not dataset.val_from_train or val - test <= VALIDATION_GAP + noise:
        return None
    return (f"the teacher's validation accuracy {val:.3f} is {100 * (val - test):.1f} points "
            f"above its test accuracy {test:.3f}: the validation split was carved out of the "
            f"training data ({n_val} images), which the teacher learned from, so early "
            f"stopping and acceptance favour copying what it memorised. Give data the "
            f"teacher never saw: a val/ folder beside train/ and test/ (x_val, y_val in an "
            f".npz or .h5).")
