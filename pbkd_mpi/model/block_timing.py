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
# ... or after this long and FEWEST_ROUNDS: calls of seconds each (a 224 px block at batch
# 32 on one thread) vary by little, and ten rounds of them would take minutes per block;
# a warm-up round longer than a tenth of it is the only one.
SLOW_BUDGET_S, FEWEST_ROUNDS = 10.0, 3


def runtimes(target: str) -> tuple[str, ...]:
    """The runtimes `student.target` names: `cpu` is TFLite and Keras on the CPU."""
    return ("tflite", "keras-cpu") if target == "cpu" else (target,)


def runtime_label(target: str) -> str:
    """What the figures of `target` were measured on, for the report and `plan`."""
    import tensorflow as tf

    labels = {"tflite": "TFLite float32, XNNPACK, 1 thread", "keras-cpu": "Keras on /CPU:0",
              "gpu": "Keras on /GPU:0"}
    return (" and ".join(labels[runtime] for runtime in runtimes(target))
            + f" (TensorFlow {tf.__version__})")


def check_target(target: str, without_gpu: str | None = None) -> None:
    """Refuse a target the ranks that time cannot time on, before anything is measured.
    `without_gpu`: which of them has no GPU (rank 0 asks for the workers), "" none; by
    default this process is asked."""
    import tensorflow as tf

    if without_gpu is None:
        without_gpu = "" if tf.config.list_physical_devices("GPU") else "this process"
    if target == "gpu" and without_gpu:
        raise UserError(
            "student.target = \"gpu\" times the candidate students on the GPU of the ranks "
            f"that time them (the workers, in a run), but TensorFlow lists no GPU on "
            f"{without_gpu}; set student.target = \"cpu\", \"tflite\" or "
            "\"keras-cpu\", or student.objective = \"flops\".")


def _runner(model, target: str, folder: Path, name: str):
    import tensorflow as tf

    if target == "tflite":
        path = folder / f"{name}.tflite"
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' export prints its endpoints
            path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        return TfliteModel(path, threads=1)
    return keras_function(model, "/GPU:0" if target == "gpu" else "/CPU:0")


def keras_function(model, device: str):
    """`model` as a traced inference call on `device`, from a NumPy batch to NumPy."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))

    def run(x):
        with tf.device(device):
            return forward(x).numpy()  # .numpy() waits for the result
    return run


def time_models(models: list, input_shape, target: str, batch: int,
                rounds: int | None = None) -> list[float]:
    """Median milliseconds of one call of each Keras model at `batch` on `target`, timed
    interleaved (time_callables)."""
    with tempfile.TemporaryDirectory() as folder:
        runners = [_runner(model, target, Path(folder), f"candidate{i}")
                   for i, model in enumerate(models)]
        return time_callables(runners, input_shape, batch, rounds)


def time_callables(functions: list, input_shape, batch: int,
                   rounds: int | None = None) -> list[float]:
    """Median milliseconds of one call of each function on a float32 batch of `batch`
    random samples, timed interleaved: over `rounds` rounds, or by default as many as
    ROUND_BUDGET_S allows within MIN_ROUNDS and MAX_ROUNDS (FEWEST_ROUNDS for slow
    calls)."""
    x = np.random.default_rng(0).uniform(size=(batch, *input_shape)).astype(np.float32)
    for _ in range(WARMUP_ROUNDS):
        begun = time.perf_counter()
        for run in functions:
            run(x)
        if time.perf_counter() - begun > SLOW_BUDGET_S / 10:
            break  # calls this slow traced and packed in the first round
    times: list[list[float]] = [[] for _ in functions]
    started = time.perf_counter()

    def more() -> bool:
        done, spent = len(times[0]), time.perf_counter() - started
        if rounds:
            return done < rounds
        return done < MAX_ROUNDS and (spent < ROUND_BUDGET_S or done < MIN_ROUNDS) and (
            spent < SLOW_BUDGET_S or done < FEWEST_ROUNDS)
    while more():
        for run, series in zip(functions, times):
            begun = time.perf_counter()
            run(x)
            series.append(time.perf_counter() - begun)
    return [1000.0 * statistics.median(series) for series in times]
