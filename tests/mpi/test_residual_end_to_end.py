"""A ResNet-style teacher (skip connections, a nested backbone) through the whole pipeline
under mpiexec -n 2, cut at `block` granularity."""

import json

import keras
import numpy as np
from keras import layers

from ..conftest import run_mpi

SIZE = 16


def _residual_teacher():
    """A stem, a backbone model of two residual blocks (the second strided, with a 1x1
    projection shortcut) used as a layer, and a classifier head."""
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((SIZE, SIZE, 8))
    y = layers.Conv2D(8, 3, padding="same", use_bias=False, name="r1_conv1")(inner_in)
    y = layers.BatchNormalization(name="r1_bn1")(y)
    y = layers.ReLU(name="r1_relu1")(y)
    y = layers.Conv2D(8, 3, padding="same", use_bias=False, name="r1_conv2")(y)
    y = layers.BatchNormalization(name="r1_bn2")(y)
    x = layers.ReLU(name="r1_out")(layers.Add(name="r1_add")([inner_in, y]))
    y = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="r2_conv1")(x)
    y = layers.Conv2D(16, 3, padding="same", name="r2_conv2")(y)
    shortcut = layers.Conv2D(16, 1, strides=2, name="r2_shortcut")(x)
    x = layers.ReLU(name="r2_out")(layers.Add(name="r2_add")([shortcut, y]))
    backbone = keras.Model(inner_in, x, name="backbone")

    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(4, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs, name="tiny_resnet")
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def test_residual_teacher_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(400, SIZE, SIZE, 3), dtype=np.uint8)
    y = (x.mean(axis=(1, 2, 3)) > 127).astype(np.int64) + 2 * (x[:, 0, 0, 0] > 127)
    np.savez(tmp_path / "data.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:],
             y_test=y[300:])
    teacher = _residual_teacher()
    teacher.save(tmp_path / "teacher.keras")
    run_dir = tmp_path / "run"
    result = run_mpi(2, [
        "run", "--run-dir", run_dir,
        # The published students, whose layers this test checks (the latency objective
        # may choose other forms: tests/test_choice.py, tests/mpi/test_end_to_end.py).
        "--set", "student.objective=params",
        "--set", f"teacher.source={tmp_path / 'teacher.keras'}",
        "--set", f"data.source={tmp_path / 'data.npz'}",
        "--set", f"data.image_size=[{SIZE}, {SIZE}]",
        "--set", "blocks.granularity=block",
        "--set", "distill.epochs=3", "--set", "finetune.epochs=1",
        "--set", "distill.chained_epochs=1",  # through the head of a residual graph too
    ], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok"
    blocks = {b["name"]: b for b in report["blocks"]}
    # The stem conv, then each residual block whole: input tensor to the ReLU after the Add.
    assert set(blocks) == {"stem", "r1_out", "r2_out"}
    assert blocks["r2_out"]["layers"][-2:] == ["r2_add", "r2_out"]
    for b in blocks.values():
        assert b["student_params"] < b["teacher_params"]
        assert np.isfinite(b["val_mse"])
    student = keras.saving.load_model(run_dir / "student.keras")
    names = {layer.name for layer in student.layers}
    assert "r1_out_student_add" in names  # same shape in and out: the student is residual
    assert not names & {"r1_conv1", "r2_conv1", "r2_shortcut", "r2_add"}
    assert {"gap", "classifier"} <= names  # the head stays the teacher's
    # The chained pass's last block distilled through that head (cut after the Add's ReLU).
    chained = {row["name"]: row for row in report["chained"]["blocks"]}
    assert chained["r2_out"]["head_weight"] == 1.0 and chained["r2_out"]["epochs"] == 1
    assert report["student"]["params"] < report["teacher"]["params"]
