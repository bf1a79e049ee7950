"""Exports of the student, each loaded back from disk and run against the Keras student."""

from __future__ import annotations

import numpy as np

from pbkd_mpi.output.deploy import export_figures
from pbkd_mpi.output.exports import Export, tflite_kinds, write_exports


def test_every_export_loads_back_and_agrees_with_the_keras_student(tiny_teacher, tiny_dataset,
                                                                   tmp_path):
    import keras

    from pbkd_mpi.model.teacher import fit_classifier

    # Trained a little, so predicted classes are decided (an untrained model's outputs are
    # near-uniform and int8 rounding flips them).
    student = keras.models.clone_model(tiny_teacher)
    student.set_weights(tiny_teacher.get_weights())
    fit_classifier(student, tiny_dataset, epochs=3, batch_size=32, learning_rate=3e-3,
                   patience=3, probabilities=True, seed=0)
    keras_path = tmp_path / "student.keras"
    student.save(keras_path)
    exports = write_exports(student, keras_path, tmp_path, True, tflite_kinds("both"),
                            tiny_dataset.x_val)
    assert [e.format for e in exports] == ["keras", "saved_model", "tflite_float32",
                                           "tflite_int8"]
    figures = export_figures(student, exports, tiny_dataset.image_shape, tiny_dataset.x_val,
                             repeats=3)
    for name in ("keras", "saved_model", "tflite_float32"):
        assert figures[name]["max_abs_diff"] < 1e-4, (name, figures[name])
        assert figures[name]["class_agreement"] == 1.0
    # int8 quantises weights and activations: outputs move, the predicted class mostly not.
    assert figures["tflite_int8"]["max_abs_diff"] < 0.1, figures["tflite_int8"]
    assert figures["tflite_int8"]["class_agreement"] >= 0.9
    assert figures["tflite_int8"]["bytes"] < figures["tflite_float32"]["bytes"]
    for name in ("saved_model", "tflite_float32", "tflite_int8"):
        assert set(figures[name]["latency_ms"]) == {"batch_1", "batch_32"}
        assert all(v > 0 for v in figures[name]["latency_ms"].values())
    # A loaded TFLite model takes any batch size.
    tflite = Export("tflite_float32", tmp_path / "student_float32.tflite").load()
    np.testing.assert_allclose(tflite(tiny_dataset.x_val[:3]),
                               student.predict(tiny_dataset.x_val[:3], verbose=0), atol=1e-4)


def test_no_export_asked_writes_only_the_keras_file(tiny_teacher, tiny_dataset, tmp_path):
    exports = write_exports(tiny_teacher, tmp_path / "student.keras", tmp_path, False,
                            tflite_kinds("none"), tiny_dataset.x_val)
    assert [e.format for e in exports] == ["keras"]
    assert not (tmp_path / "student_savedmodel").exists()


def test_the_teacher_is_timed_in_tflite_beside_the_student(tiny_teacher, tiny_dataset):
    from pbkd_mpi.output.deploy import teacher_tflite_latency
    from pbkd_mpi.output.report import _deployment_rows

    figures = teacher_tflite_latency(tiny_teacher, ("float32",), tiny_dataset.image_shape,
                                     tiny_dataset.x_val, repeats=3)
    assert set(figures) == {"float32"} and set(figures["float32"]) == {"batch_1", "batch_32"}
    assert all(ms > 0 for ms in figures["float32"].values())
    student_ms = {"batch_1": figures["float32"]["batch_1"] / 2, "batch_32": 1.0}
    deployment = {
        "teacher": {"file_bytes": None, "latency_ms": {"batch_1": 1.0, "batch_32": 8.0},
                    "tflite_latency_ms": figures},
        "student": {"file_bytes": None, "latency_ms": {"batch_1": 2.0, "batch_32": 4.0}},
        "exports": {"tflite_float32": {"latency_ms": student_ms}},
    }
    rows = _deployment_rows(deployment)
    assert rows[0].endswith("| 2.00 |") and rows[1].endswith("| 0.50 |")  # Keras
    tflite = [row for row in rows if "TFLite float32" in row]
    assert len(tflite) == 2 and tflite[0].endswith("| 0.50 |")
