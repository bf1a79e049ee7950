"""Student blocks timed alone on the runtime a user deploys to (student.target).

Each candidate is a standalone block model on random inputs of the block's shape; the
weights do not change the time. The candidates of one block are timed interleaved (one
call of each per round), so a slow spell of a shared machine hits all of them alike, and
the medians are compared.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pbkd_mpi.errors import UserError
from pbkd_mpi.output.exports import TfliteModel

WARMUP_ROUNDS = 3
MIN_ROUNDS, MAX_ROUNDS = 10, 200
# Rounds stop once this much time is spent on one block's candidates (after MIN_ROUNDS):
# a 224 px block at batch 32 is slow, a 32 px one fast, and both need a stable median.
ROUND_BUDGET_S = 1.0


def runtime_label(target: str) -> str:
    """What the figures of `target` were measured on, for the report and `plan`."""
    import tensorflow as tf

    if target == "tflite":
        return f"TFLite float32, XNNPACK, 1 thread (TensorFlow {tf.__version__})"
    device = "/GPU:0" if target == "gpu" else "/CPU:0"
    return f"Keras on {device} (TensorFlow {tf.__version__})"


def check_target(target: str) -> None:
    """Refuse a target this rank cannot time on, before anything is measured."""
    import tensorflow as tf

    if target == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise UserError(
            "student.target = \"gpu\" times the candidate students on rank 0's GPU, but "
            "TensorFlow sees none here (tf.config.list_physical_devices('GPU') is empty); "
            "set student.target = \"tflite\" or \"keras-cpu\", or student.objective = "
            "\"flops\".")


def _runner(model, target: str, folder: Path, name: str):
    import tensorflow as tf

    if target == "tflite":
        path = folder / f"{name}.tflite"
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' export prints its endpoints
            path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        return TfliteModel(path, threads=1)
    device = "/GPU:0" if target == "gpu" else "/CPU:0"
    forward = tf.function(lambda x: model(x, training=False))

    def run(x):
        with tf.device(device):
            return forward(x).numpy()  # .numpy() waits for the result
    return run


def time_models(models: list, input_shape, target: str, batch: int,
                rounds: int | None = None) -> list[float]:
    """Median milliseconds of one call of each model at `batch`, timed interleaved: over
    `rounds` rounds, or by default as many as ROUND_BUDGET_S allows within MIN_ROUNDS and
    MAX_ROUNDS."""
    least, most = (rounds, rounds) if rounds else (MIN_ROUNDS, MAX_ROUNDS)
    x = np.random.default_rng(0).uniform(size=(batch, *input_shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        runners = [_runner(model, target, Path(folder), f"candidate{i}")
                   for i, model in enumerate(models)]
        for _ in range(WARMUP_ROUNDS):
            for run in runners:
                run(x)
        times: list[list[float]] = [[] for _ in runners]
        started = time.perf_counter()
        while len(times[0]) < most and (
                len(times[0]) < least or time.perf_counter() - started < ROUND_BUDGET_S):
            for run, series in zip(runners, times):
                begun = time.perf_counter()
                run(x)
                series.append(time.perf_counter() - begun)
    return [1000.0 * statistics.median(series) for series in times]
