"""Exports of the student, each loaded back from disk and run against the Keras student."""

from __future__ import annotations

import numpy as np

from pbkd_mpi.output.exports import Export, check_exports, tflite_kinds, write_exports


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
    figures = check_exports(student, exports, tiny_dataset.x_val)
    for name in ("keras", "saved_model", "tflite_float32"):
        assert figures[name]["max_abs_diff"] < 1e-4, (name, figures[name])
        assert figures[name]["class_agreement"] == 1.0
    # int8 quantises weights and activations: outputs move, the predicted class mostly not.
    assert figures["tflite_int8"]["max_abs_diff"] < 0.1, figures["tflite_int8"]
    assert figures["tflite_int8"]["class_agreement"] >= 0.9
    assert figures["tflite_int8"]["bytes"] < figures["tflite_float32"]["bytes"]
    # A loaded TFLite model takes any batch size.
    tflite = Export("tflite_float32", tmp_path / "student_float32.tflite").load()
    np.testing.assert_allclose(tflite(tiny_dataset.x_val[:3]),
                               student.predict(tiny_dataset.x_val[:3], verbose=0), atol=1e-4)


def test_no_export_asked_writes_only_the_keras_file(tiny_teacher, tiny_dataset, tmp_path):
    exports = write_exports(tiny_teacher, tmp_path / "student.keras", tmp_path, False,
                            tflite_kinds("none"), tiny_dataset.x_val)
    assert [e.format for e in exports] == ["keras"]
    assert not (tmp_path / "student_savedmodel").exists()


def test_teacher_and_student_are_timed_on_every_runtime_the_job_deploys_to(
        tiny_teacher, tiny_dataset, tmp_path):
    import os

    import keras

    from pbkd_mpi.output.deploy import keras_cpu_ms, latency_rows
    from pbkd_mpi.output.report import _deployment_rows

    # A student that does a third of the teacher's work: its first two blocks alone.
    student = keras.Model(tiny_teacher.inputs, tiny_teacher.get_layer("pool1").output)
    student = keras.Sequential([student, keras.layers.GlobalAveragePooling2D(),
                                keras.layers.Dense(tiny_dataset.num_classes)])
    write_exports(student, tmp_path / "student.keras", tmp_path, False, ("float32", "int8"),
                  tiny_dataset.x_val)
    rows = latency_rows(tiny_teacher, student,
                        {kind: tmp_path / f"student_{kind}.tflite" for kind in ("float32", "int8")},
                        tiny_dataset.image_shape, tiny_dataset.x_val, rounds=3)
    cores = len(os.sched_getaffinity(0))
    expected = [("keras", "CPU", batch) for batch in (1, 32)] + [
        (f"tflite-{kind}", threads, batch) for kind in ("float32", "int8")
        for threads in sorted({1, cores}) for batch in (1, 32)]
    assert [(r["runtime"], r["device"] if r["runtime"] == "keras" else r["threads"],
             r["batch"]) for r in rows] == expected
    for row in rows:
        assert row["teacher_ms"] > 0 and row["student_ms"] > 0
        assert row["ratio"] == row["student_ms"] / row["teacher_ms"]
    assert keras_cpu_ms(rows, "student") == {"batch_1": rows[0]["student_ms"],
                                             "batch_32": rows[1]["student_ms"]}
    deployment = {"teacher": {"file_bytes": None}, "student": {"file_bytes": None},
                  "latency": rows, "latency_runtime": "here"}
    text = _deployment_rows(deployment)
    assert len(text) == len(rows) + 1
    assert "| latency, batch 32 (TFLite int8, XNNPACK, 1 thread) |" in "\n".join(text)
    assert text[0].startswith("| latency, batch 1 (Keras, CPU, ")
    assert text[0].endswith(f"| {rows[0]['ratio']:.2f} |")
