"""Student blocks timed alone on the runtime a user deploys to (student.target).

Each candidate is a standalone block model on random inputs of the block's shape; the
weights do not change the time. The candidates of one block are timed interleaved (one
call of each per round), so a slow spell of a shared machine hits all of them alike, and
the medians are compared.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from pbkd_mpi.errors import UserError
from pbkd_mpi.output.exports import TfliteModel
from pbkd_mpi.output.logs import native_output_to_log

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
    if target == "tflite":
        path = folder / f"{name}.tflite"
        path.write_bytes(tflite_bytes(model))
        return TfliteModel(path, threads=1)
    return keras_function(model, "/GPU:0" if target == "gpu" else "/CPU:0",
                          model.input_shape[1:])


def tflite_bytes(model) -> bytes:
    """`model` converted to TFLite float32 from its traced inference function, for timing:
    the operations of TFLiteConverter.from_keras_model, which writes a SavedModel first
    and takes 4-5x as long (0.42 s against 0.095 s a NASNetMobile candidate at 96 px,
    tests/test_choice.py compares the two)."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    # The converter's own lines (and its notice that this path is deprecated) go to the
    # log, not the console.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                native_output_to_log():
            warnings.simplefilter("ignore")
            try:
                # Without the model as its trackable object: with it the variables come
                # out unset (outputs of 1e29).
                return tf.lite.TFLiteConverter.from_concrete_functions([function]).convert()
            except Exception:  # a TensorFlow without this path: the SavedModel one
                return tf.lite.TFLiteConverter.from_keras_model(model).convert()
    finally:
        absl.setLevel(level)


def keras_function(model, device: str, input_shape=None):
    """`model` as a traced inference call on `device`, from a NumPy batch to NumPy; with
    `input_shape` (one sample's), traced once for every batch size (timed alike: 1.83 and
    1.77 ms at batch 1, 25.1 and 25.1 ms at 32, a 24x24x64 separable block), else once
    per batch size."""
    import tensorflow as tf

    signature = None if input_shape is None else [
        tf.TensorSpec((None, *input_shape), tf.float32)]
    forward = tf.function(lambda x: model(x, training=False), input_signature=signature)

    def run(x):
        with tf.device(device):
            return forward(x).numpy()  # .numpy() waits for the result
    return run


def time_models(models: list, input_shape, target: str, batch: int,
                rounds: int | None = None) -> list[float]:
    """Median milliseconds of one call of each Keras model at `batch` on `target`, timed
    interleaved (time_callables)."""
    return time_models_at(models, input_shape, target, [batch], rounds)[batch]


def time_models_at(models: list, input_shape, target: str, batches,
                   rounds: int | None = None) -> dict[int, list[float]]:
    """time_models at each of `batches`: {batch: milliseconds of each model}. Each model
    is converted (TFLite, most of the cost of timing a small block) or traced once for
    all the batches."""
    with model_runners(models, target) as runners:
        return {batch: time_callables(runners, input_shape, batch, rounds)
                for batch in batches}


@contextlib.contextmanager
def model_runners(models: list, target: str):
    """Each Keras model as a callable on `target` (a NumPy batch of any size to NumPy):
    converted to TFLite (its file in a folder that lasts as long as the block) or traced,
    once for every batch and round."""
    with tempfile.TemporaryDirectory() as folder:
        yield [_runner(model, target, Path(folder), f"candidate{i}")
               for i, model in enumerate(models)]


def time_callables(functions: list, input_shape, batch: int,
                   rounds: int | None = None) -> list[float]:
    """Median milliseconds of one call of each function on a float32 batch of `batch`
    random samples, timed interleaved: over `rounds` rounds, or by default as many as
    ROUND_BUDGET_S allows within MIN_ROUNDS and MAX_ROUNDS (FEWEST_ROUNDS for slow
    calls)."""
    timer = InterleavedTimer(functions, input_shape, batch)
    timer.run(rounds or MAX_ROUNDS, budgeted=not rounds)
    return timer.medians()


class InterleavedTimer:
    """The functions of time_callables, warmed up on one batch and timed round after round
    (one call of each per round), as many rounds at a time as the caller asks: a caller can
    stop once the medians so far answer its question (model/choice.time_candidates)."""

    def __init__(self, functions: list, input_shape, batch: int):
        self.functions = functions
        self.x = np.random.default_rng(0).uniform(size=(batch, *input_shape)).astype(
            np.float32)
        for _ in range(WARMUP_ROUNDS):
            begun = time.perf_counter()
            for run in functions:
                run(self.x)
            if time.perf_counter() - begun > SLOW_BUDGET_S / 10:
                break  # calls this slow traced and packed in the first round
        self.times: list[list[float]] = [[] for _ in functions]
        self.spent = 0.0  # seconds in timed rounds

    @property
    def done(self) -> int:
        return len(self.times[0])

    def wants_more(self) -> bool:
        """Whether the default budget allows another round: ROUND_BUDGET_S within
        MIN_ROUNDS and MAX_ROUNDS, FEWEST_ROUNDS for slow calls."""
        return self.done < MAX_ROUNDS and (
            self.spent < ROUND_BUDGET_S or self.done < MIN_ROUNDS) and (
            self.spent < SLOW_BUDGET_S or self.done < FEWEST_ROUNDS)

    def run(self, rounds: int, budgeted: bool = True) -> None:
        """`rounds` more rounds; `budgeted`: fewer where the budget is spent first."""
        for _ in range(rounds):
            if budgeted and not self.wants_more():
                return
            begun_round = time.perf_counter()
            for run, series in zip(self.functions, self.times):
                begun = time.perf_counter()
                run(self.x)
                series.append(time.perf_counter() - begun)
            self.spent += time.perf_counter() - begun_round

    def medians(self) -> list[float]:
        """Median milliseconds of each function over the rounds so far."""
        return [1000.0 * statistics.median(series) for series in self.times]
