"""An EfficientNet-style teacher (MBConv units with squeeze-and-excitation, swish, 1x1
convs) through the whole pipeline under mpiexec -n 3, at `layer` granularity: its 1x1
convs, which no separable student can shrink, are distilled by the low-rank family."""

import json

import keras
import numpy as np
from keras import layers

from ..conftest import run_mpi

SIZE = 16


def _bn(name):
    # Momentum 0.9: the moving statistics must settle within the test's few hundred steps.
    return layers.BatchNormalization(momentum=0.9, name=name)


def _mbconv(x, name, expand, out, strides):
    c_in = x.shape[-1]
    y = layers.Conv2D(expand, 1, use_bias=False, name=f"{name}_expand")(x)
    y = layers.Activation("swish", name=f"{name}_expand_act")(
        _bn(f"{name}_expand_bn")(y))
    y = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                               name=f"{name}_dw")(y)
    y = layers.Activation("swish", name=f"{name}_dw_act")(
        _bn(f"{name}_dw_bn")(y))
    se = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_squeeze")(y)
    se = layers.Conv2D(4, 1, activation="swish", name=f"{name}_se_reduce")(se)
    se = layers.Conv2D(expand, 1, activation="sigmoid", name=f"{name}_se_expand")(se)
    y = layers.Multiply(name=f"{name}_se_excite")([y, se])
    y = layers.Conv2D(out, 1, use_bias=False, name=f"{name}_project")(y)
    y = _bn(f"{name}_project_bn")(y)
    if strides == 1 and c_in == out:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def _efficient_teacher():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.Activation("swish", name="stem_act")(_bn("stem_bn")(x))
    x = _mbconv(x, "b1", 64, 16, 1)
    x = _mbconv(x, "b2", 64, 24, 2)
    x = layers.Conv2D(96, 1, use_bias=False, name="top")(x)
    x = layers.Activation("swish", name="top_act")(_bn("top_bn")(x))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(4, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs, name="tiny_efficientnet")
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_an_efficientnet_style_teacher_end_to_end_with_low_rank_students(tmp_path):
    rng = np.random.default_rng(0)
    # The class is the quadrant holding a bright patch, under noise: learnable in a few epochs.
    y = rng.integers(0, 4, size=480)
    x = rng.integers(0, 110, size=(480, SIZE, SIZE, 3)).astype(np.uint8)
    half = SIZE // 2
    for i, label in enumerate(y):
        row, col = divmod(int(label), 2)
        x[i, row * half:(row + 1) * half, col * half:(col + 1) * half] += 120
    np.savez(tmp_path / "data.npz", x_train=x[:400], y_train=y[:400], x_test=x[400:],
             y_test=y[400:])
    teacher = _efficient_teacher()
    teacher.fit(x[:400] / 255.0, y[:400], epochs=4, batch_size=32, verbose=0)
    teacher.save(tmp_path / "teacher.keras")
    run_dir = tmp_path / "run"
    result = run_mpi(3, [
        "run", "--run-dir", run_dir,
        # The published students, whose layers this test checks (the latency objective
        # may choose other forms: tests/test_choice.py, tests/mpi/test_end_to_end.py).
        "--set", "student.objective=params",
        "--set", f"teacher.source={tmp_path / 'teacher.keras'}",
        "--set", f"data.source={tmp_path / 'data.npz'}",
        "--set", f"data.image_size=[{SIZE}, {SIZE}]",
        "--set", "distill.epochs=2", "--set", "finetune.epochs=1",
        "--set", "distill.chained_epochs=1", "--set", "export.tflite=float32",
        "--set", "export.latency_repeats=3", "--set", "schedule.profile=false",
        "--set", "accept.max_drop=1.0",  # 80 validation images: keep every student
    ], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok"
    families = {b["name"]: b["family"] for b in report["blocks"]}
    # The 3x3 stem shrinks as a separable conv; the 1x1 expansions, projections and the top
    # conv only as low-rank pairs; the SE convs work on a 1x1 map and stay the teacher's.
    assert families == {"stem": "separable", "b1_expand": "low_rank",
                        "b1_project": "low_rank", "b2_expand": "low_rank",
                        "b2_project": "low_rank", "top": "low_rank"}
    for block in report["blocks"]:
        assert block["student_params"] < block["teacher_params"]
        assert np.isfinite(block["val_mse"])
    student = keras.saving.load_model(run_dir / "student.keras")
    names = {layer.name for layer in student.layers}
    assert {"b1_expand_student_reduce", "top_student_pw", "b1_se_reduce", "b1_dw"} <= names
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["teacher"]["accuracy"] > 0.6  # 4 classes
    assert report["student"]["accuracy_finetuned"] > 0.5
    tflite = report["deployment"]["exports"]["tflite_float32"]
    assert tflite["max_abs_diff"] < 1e-4 and tflite["class_agreement"] == 1.0
    # The teacher timed in TFLite too, so that report.md can compare where users deploy.
    timed = {(row["runtime"], row["threads"], row["batch"])
             for row in report["deployment"]["latency"]}
    assert {("tflite-float32", 1, 1), ("tflite-float32", 1, 32)} <= timed
    assert "(TFLite float32, XNNPACK, 1 thread) |" in (run_dir / "report.md").read_text()
