"""Deployment figures: inference latency on this CPU and the size of the saved models.

Latency is the median of repeated timed calls after warm-up calls (the first calls trace
and compile), for batch 1 and batch 32, with the thread pools rank 0 runs with. The figures
are for comparing teacher and student on the same machine in the same run, not absolute.
Where the job exports the student to TFLite, the teacher is converted the same way (in a
temporary folder) and timed beside it: users deploy there, and the two runtimes rank
student families differently.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pbkd_mpi.model.fold import fold_batchnorm
from pbkd_mpi.model.teacher import save_model_atomically
from pbkd_mpi.output.exports import (TfliteModel, check_exports, export_saved_model,
                                     tflite_bytes, tflite_kinds, write_exports)

BATCHES = (1, 32)
FOLD_CHECK_IMAGES = 64  # validation images the folded student is compared on
LATENCY_DEVICE = "/CPU:0"
WARMUP_CALLS = 3


def latency_ms(model, input_shape, batch: int, repeats: int = 20) -> float:
    """Median milliseconds of one forward pass of `batch` samples."""
    import tensorflow as tf

    with tf.device(LATENCY_DEVICE):  # where the label says, even when a GPU is visible
        x = tf.constant(np.random.default_rng(0).uniform(size=(batch, *input_shape)),
                        dtype=tf.float32)
        forward = tf.function(lambda inputs: model(inputs, training=False))
        for _ in range(WARMUP_CALLS):
            forward(x).numpy()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(x).numpy()  # .numpy() waits for the result
            times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


def latency_runtime() -> str:
    """What the Keras latencies ran on, for the report: runtime, device, threads."""
    import keras
    import tensorflow as tf

    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    return (f"Keras {keras.__version__} (TensorFlow {tf.__version__}) on {LATENCY_DEVICE} "
            f"({_processor_name()}), {threads} intra-op thread(s)")


def _processor_name() -> str:
    try:  # Linux: the model name; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def callable_latency_ms(function, input_shape, batch: int, repeats: int = 20) -> float:
    """Median milliseconds of `function(batch of float32 images)` returning NumPy (a loaded
    SavedModel or TFLite interpreter), timed like `latency_ms`."""
    x = np.random.default_rng(0).uniform(size=(batch, *input_shape)).astype(np.float32)
    for _ in range(WARMUP_CALLS):
        function(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(x)
        times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


def export_figures(student, exports, input_shape, check_images, repeats: int = 20) -> dict:
    """Each export of the student (exports.py), loaded back from disk: its size, its
    agreement with the Keras student, and its latency at batch 1 and 32."""
    figures = check_exports(student, exports, check_images)
    for export in exports:
        if export.format == "keras":
            continue  # the same model as deployment.student
        function = export.load()
        figures[export.format]["latency_ms"] = {
            f"batch_{b}": callable_latency_ms(function, input_shape, b, repeats) for b in BATCHES}
    return figures


def deployment_figures(teacher, student, input_shape, teacher_file, student_file,
                       repeats: int = 20) -> dict:
    """{"teacher"|"student": {"latency_ms": {"batch_1", "batch_32"}, "file_bytes"},
    "latency_runtime": what they ran on}."""
    figures = {"latency_runtime": latency_runtime()}
    for name, model, path in (("teacher", teacher, teacher_file),
                              ("student", student, student_file)):
        figures[name] = {
            "latency_ms": {f"batch_{b}": latency_ms(model, input_shape, b, repeats)
                           for b in BATCHES},
            "file_bytes": os.path.getsize(path) if path and os.path.exists(path) else None,
        }
    return figures


def teacher_tflite_latency(teacher, kinds, input_shape, representative,
                           repeats: int = 20) -> dict:
    """{kind: {"batch_1", "batch_32"}}: the teacher converted to TFLite as the student's
    exports are (via a SavedModel; int8 calibrated on the same images) and timed as
    `export_figures` times them."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="pbkd-teacher-tflite-") as folder:
        saved_model = export_saved_model(teacher, Path(folder) / "savedmodel")
        for kind in kinds:
            path = Path(folder) / f"teacher_{kind}.tflite"
            path.write_bytes(tflite_bytes(saved_model, kind, representative))
            function = TfliteModel(path)
            figures[kind] = {f"batch_{b}": callable_latency_ms(function, input_shape, b, repeats)
                             for b in BATCHES}
    return figures


def deploy_student(teacher, student, dataset, teacher_file, student_path, run_dir,
                   export_config, log) -> dict:
    """The student saved to `student_path` (its BNs folded when the job says so), latency
    and size of teacher and student, and the student's exports (SavedModel, TFLite)
    written and checked against it: the report's `deployment`."""
    repeats, kinds = export_config.latency_repeats, tflite_kinds(export_config.tflite)
    folded = {"layers": 0, "max_abs_diff": 0.0}
    if export_config.fold_batchnorm:
        student, folded = fold_batchnorm(student, dataset.x_val[:FOLD_CHECK_IMAGES])
    save_model_atomically(student, student_path)
    deployment = deployment_figures(teacher, student, dataset.image_shape, teacher_file,
                                    student_path, repeats)
    exports = write_exports(student, student_path, run_dir, export_config.saved_model,
                            kinds, dataset.x_val)
    deployment["folded_batchnorm"] = folded
    deployment["exports"] = export_figures(student, exports, dataset.image_shape,
                                           dataset.x_val, repeats)
    if kinds:
        deployment["teacher"]["tflite_latency_ms"] = teacher_tflite_latency(
            teacher, kinds, dataset.image_shape, dataset.x_val, repeats)
    for name, figures in deployment["exports"].items():
        log.detail(f"export {name}: {figures['bytes']} bytes, largest output difference "
                   f"{figures['max_abs_diff']:.2g}, class agreement "
                   f"{figures['class_agreement']:.3f}")
    log(f"latency batch 1 (CPU, median): teacher "
        f"{deployment['teacher']['latency_ms']['batch_1']:.2f} ms, student "
        f"{deployment['student']['latency_ms']['batch_1']:.2f} ms")
    return deployment
