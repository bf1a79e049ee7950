"""A Conv1D teacher of multichannel time series through the whole pipeline under
mpiexec -n 3: the data are sequences read from an HDF5 file as stored, the blocks 1-D
convs, the students 1-D separable and low-rank convs."""

import json

import h5py
import keras
import numpy as np
from keras import layers

from ..conftest import run_mpi

STEPS, CHANNELS, CLASSES = 64, 2, 4


def _signals(count: int, seed: int):
    """Class k: a burst at 2 + 2k cycles per window in channel 0, at a random phase and
    place, under noise; channel 1 is noise with a slow drift. Learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=count)
    t = np.arange(STEPS) / STEPS
    x = rng.normal(scale=0.6, size=(count, STEPS, CHANNELS)).astype(np.float32)
    for i, label in enumerate(labels):
        cycles = 2 + 2 * int(label)
        start = rng.integers(0, STEPS // 4)
        envelope = (np.arange(STEPS) >= start) & (np.arange(STEPS) < start + 3 * STEPS // 4)
        x[i, :, 0] += envelope * np.sin(2 * np.pi * (cycles * t + rng.random()))
        x[i, :, 1] += np.linspace(0, rng.normal(), STEPS)
    return x, labels


def _bn(name):
    return layers.BatchNormalization(momentum=0.9, name=name)


def _sequence_teacher():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((STEPS, CHANNELS))
    x = layers.Conv1D(16, 7, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.ReLU(name="relu1")(_bn("bn1")(x))
    x = layers.Conv1D(32, 5, strides=2, padding="same", use_bias=False, name="conv2")(x)
    x = layers.ReLU(name="relu2")(_bn("bn2")(x))
    y = layers.Conv1D(32, 5, padding="same", use_bias=False, name="conv3")(x)
    y = layers.ReLU(name="relu3")(_bn("bn3")(y))
    y = layers.Conv1D(32, 5, padding="same", use_bias=False, name="conv4")(y)
    x = layers.ReLU(name="relu4")(layers.Add(name="add")([x, _bn("bn4")(y)]))
    x = layers.MaxPooling1D(name="pool")(x)
    x = layers.Conv1D(64, 3, padding="same", use_bias=False, name="conv5")(x)
    x = layers.ReLU(name="relu5")(_bn("bn5")(x))
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    outputs = layers.Dense(CLASSES, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs, name="sequence_teacher")
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_a_conv1d_teacher_of_time_series_end_to_end(tmp_path):
    x, y = _signals(600, seed=0)
    with h5py.File(tmp_path / "signals.h5", "w") as f:
        for name, value in dict(x_train=x[:480], y_train=y[:480], x_test=x[480:],
                                y_test=y[480:]).items():
            f[name] = value
    teacher = _sequence_teacher()
    teacher.fit(x[:480], y[:480], epochs=6, batch_size=32, verbose=0)
    teacher.save(tmp_path / "teacher.keras")
    run_dir = tmp_path / "run"
    result = run_mpi(3, [
        "run", "--run-dir", run_dir,
        "--set", "data.kind=sequences",
        "--set", f"data.source={tmp_path / 'signals.h5'}",
        # The published students, whose layers this test checks (the latency objective
        # may choose other forms: tests/test_choice.py, tests/mpi/test_end_to_end.py).
        "--set", "student.objective=params",
        "--set", f"teacher.source={tmp_path / 'teacher.keras'}",
        "--set", "distill.epochs=3", "--set", "finetune.epochs=2",
        "--set", "distill.chained_epochs=1", "--set", "export.tflite=float32",
        "--set", "export.latency_repeats=3", "--set", "schedule.profile=false",
        "--set", "accept.max_drop=1.0",  # 48 validation sequences: keep every student
    ], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok"
    blocks = {b["name"]: b for b in report["blocks"]}
    assert set(blocks) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    assert all(b["student_params"] < b["teacher_params"] for b in blocks.values())
    assert all(np.isfinite(b["val_mse"]) for b in blocks.values())
    student = keras.saving.load_model(run_dir / "student.keras")
    kinds = {type(layer).__name__ for layer in student.layers}
    assert "DepthwiseConv1D" in kinds and not kinds & {"Conv2D", "DepthwiseConv2D"}
    assert student.get_layer("conv2_student_dw").strides == (2,)
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["teacher"]["accuracy"] > 0.6  # 4 classes
    assert report["student"]["accuracy_finetuned"] > report["teacher"]["accuracy"] - 0.15
    tflite = report["deployment"]["exports"]["tflite_float32"]
    assert tflite["max_abs_diff"] < 1e-4 and tflite["class_agreement"] == 1.0
    # The teacher timed in TFLite too, so that report.md can compare where users deploy.
    timed = {(row["runtime"], row["threads"], row["batch"])
             for row in report["deployment"]["latency"]}
    assert {("tflite-float32", 1, 1), ("tflite-float32", 1, 32)} <= timed
    assert "(TFLite float32, XNNPACK, 1 thread) |" in (run_dir / "report.md").read_text()
