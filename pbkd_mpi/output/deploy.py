"""Deployment figures: teacher against student latency where users deploy, and the size
of the saved models.

Every runtime the job deploys to is measured for teacher and student alike, in one
process, interleaved (one call of each per round, model/block_timing.time_callables, so
a slow spell of a shared machine hits both), medians after warm-up calls, at batch 1 and
32: Keras on rank 0's CPU with TensorFlow's threads, on its GPU when it has one, and each
TFLite file the job exports (float32, int8) with XNNPACK on 1 thread and on all of rank
0's cores. The teacher is converted to TFLite as the student is (via a SavedModel, int8
calibrated on the same images), in a temporary folder. The figures compare teacher and
student on one machine in one run; they are not absolute.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

from pbkd_mpi.data.images import sample_images
from pbkd_mpi.model.block_timing import keras_function, time_callables
from pbkd_mpi.model.fold import fold_batchnorm
from pbkd_mpi.model.inference import inference_copy
from pbkd_mpi.mpi.devices import intra_op_threads, node_cores
from pbkd_mpi.model.teacher import save_model_atomically
from pbkd_mpi.output.exports import (TFLITE_FILES, TfliteModel, check_exports,
                                     export_saved_model, tflite_bytes, tflite_kinds,
                                     write_exports)
from pbkd_mpi.output.problems import Problems, attempt
from pbkd_mpi.output.report import latency_label

BATCHES = (1, 32)
FOLD_CHECK_IMAGES = 64  # validation images the folded student is compared on


def _processor_name() -> str:
    try:  # Linux: the model name; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latency_runtime() -> str:
    """What the latencies ran on, for the report: versions and the processor."""
    import keras
    import tensorflow as tf

    return (f"Keras {keras.__version__}, TensorFlow {tf.__version__} and its TFLite "
            f"interpreter, on {_processor_name()} ({node_cores()} core(s) for rank 0)")


def latency_rows(teacher, student, student_tflite: dict, input_shape, representative,
                 rounds: int, problems: Problems | None = None) -> list[dict]:
    """[{"runtime", "device", "threads", "batch", "teacher_ms", "student_ms", "ratio"}]
    for each runtime and batch (module docstring). `student_tflite`: {kind: the student's
    TFLite file} (exports.TFLITE_FILES) to time against the teacher's; a teacher that
    cannot be converted to a kind is recorded in `problems` (None: raised) and that kind
    left out."""
    import tensorflow as tf

    pairs = [("keras", "CPU", intra_op_threads(),
              keras_function(teacher, "/CPU:0"), keras_function(student, "/CPU:0"))]
    if tf.config.list_physical_devices("GPU"):
        pairs.append(("keras", "GPU", None, keras_function(teacher, "/GPU:0"),
                      keras_function(student, "/GPU:0")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="pbkd-teacher-tflite-") as folder:
        saved_model = None
        if student_tflite:
            saved_model = attempt(problems, "latency: the teacher as a SavedModel",
                                   export_saved_model, teacher, Path(folder) / "savedmodel")
        for kind, student_file in student_tflite.items() if saved_model else ():
            path = Path(folder) / f"teacher_{kind}.tflite"
            converted = attempt(problems, f"latency: the teacher as TFLite {kind}",
                                 tflite_bytes, saved_model, kind, representative)
            if converted is None:
                continue
            path.write_bytes(converted[0])
            for threads in sorted({1, node_cores()}):
                pairs.append((f"tflite-{kind}", "CPU", threads, TfliteModel(path, threads),
                              TfliteModel(student_file, threads)))
        for runtime, device, threads, teacher_call, student_call in pairs:
            for batch in BATCHES:
                teacher_ms, student_ms = time_callables([teacher_call, student_call],
                                                        input_shape, batch, rounds)
                rows.append({"runtime": runtime, "device": device, "threads": threads,
                             "batch": batch, "teacher_ms": teacher_ms,
                             "student_ms": student_ms, "ratio": student_ms / teacher_ms})
    return rows


def keras_cpu_ms(rows: list[dict], model: str) -> dict:
    """{"batch_1", "batch_32"}: `model`'s ("teacher" or "student") Keras CPU latencies."""
    return {f"batch_{row['batch']}": row[f"{model}_ms"] for row in rows
            if (row["runtime"], row["device"]) == ("keras", "CPU")}


def deploy_student(teacher, student, dataset, teacher_file, student_path, run_dir,
                   export_config, log, problems: Problems) -> dict:
    """The deployed student saved to `student_path`: its inference copy (model/inference:
    without the layers that only act in training), its BNs folded when the job says so;
    latency and size of teacher (its inference copy too) and student, and the student's
    exports (SavedModel, TFLite) written and checked against it: the report's
    `deployment`. Each step that fails is recorded in `problems` and the others go on."""
    kinds = tflite_kinds(export_config.tflite)
    teacher, teacher_removed = inference_copy(teacher)
    student, removed = inference_copy(student)
    if removed:
        log.detail(f"deployed student: {len(removed)} layer(s) that only act in training "
                   f"left out ({', '.join(removed)})")
    folded = {"layers": 0, "max_abs_diff": 0.0}
    if export_config.fold_batchnorm:
        student, folded = problems.attempt(
            "fold_batchnorm", fold_batchnorm, student,
            sample_images(dataset.x_val, FOLD_CHECK_IMAGES), default=(student, folded))
    if problems.attempt("save student.keras", save_model_atomically, student, student_path,
                        default=False) is False:
        Path(student_path).unlink(missing_ok=True)  # never an earlier run's student
    exports = write_exports(student, student_path, run_dir, export_config.saved_model,
                            kinds, dataset.x_val, problems)
    checked = check_exports(student, exports, dataset.x_val, problems)
    # Only files this interpreter runs are timed: a TF Select file needs the Flex delegate.
    timed = {kind: Path(run_dir) / TFLITE_FILES[kind] for kind in kinds
             if checked.get(f"tflite_{kind}", {}).get("ops") == "builtins"}
    rows = problems.attempt("latency", latency_rows, teacher, student, timed,
                            dataset.image_shape, dataset.x_val,
                            export_config.latency_repeats, problems, default=[])
    deployment = {"latency_runtime": latency_runtime(), "latency": rows,
                  "training_only_removed": {"student": removed, "teacher": teacher_removed}}
    for name, path in (("teacher", teacher_file), ("student", student_path)):
        deployment[name] = {
            "latency_ms": keras_cpu_ms(rows, name),
            "file_bytes": os.path.getsize(path) if path and os.path.exists(path) else None}
    deployment["folded_batchnorm"] = folded
    deployment["exports"] = checked
    for name, figures in checked.items():
        log.detail(f"export {name}: {figures['bytes']} bytes, largest output difference "
                   f"{figures['max_abs_diff']:.2g}, class agreement "
                   f"{figures['class_agreement']:.3f}"
                   + (", with TF Select ops" if figures["ops"] == "builtins+select_tf" else ""))
    if rows:
        log("latency, student / teacher: " + "; ".join(
            f"{latency_label(row)}, batch {row['batch']}: {row['ratio']:.2f}" for row in rows))
    return deployment
