"""Student against teacher latency where users deploy, measured in one process.

RUN is a finished run directory: report.json names the teacher's file (a built-in
teacher's) or source (a user's), RUN/student.keras is the student. Each model is
converted with `tf.lite.TFLiteConverter.from_keras_model` and run by the TFLite interpreter (XNNPACK, 1 thread) at batch 1 and at batch 32, and by
Keras on the CPU (a traced call, TensorFlow's default threads) at batch 32. The
measurements are interleaved: each round times one call of the teacher, then one of each
student, so a slow spell of the machine hits all of them; after warm-up calls, ROUNDS
rounds, medians. Ratios are student over teacher.

With `--families separable,low_rank`, students of the same blocks in those families are
assembled untrained (latency does not depend on the weights; the run's job gives the
blocks and depth multiplier) and timed beside the run's own student.

Prints one JSON object per model and, last, `{"tflite_b1": ratio, "tflite_b32": ratio,
"keras_b32": ratio, "families": {family: {...}}}` for the run's student.

    python benchmarks/student_latency.py runs/demo [--rounds 200] [--families separable,low_rank]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP = 5
MEASURES = (("tflite_b1", "tflite", 1), ("tflite_b32", "tflite", 32), ("keras_b32", "keras", 32))


def tflite_runner(model, folder: Path, name: str):
    import tensorflow as tf

    path = folder / f"{name}.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    shapes = {}

    def run(x):
        if shapes.get("now") != x.shape:
            interpreter.resize_tensor_input(index, x.shape)
            interpreter.allocate_tensors()
            shapes["now"] = x.shape
        interpreter.set_tensor(index, x)
        interpreter.invoke()
    return run


def keras_runner(model):
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    return lambda x: forward(x).numpy()


def family_students(run: Path, teacher, families) -> dict:
    from pbkd_mpi.config import load_job
    from pbkd_mpi.model.assemble import assemble_student
    from pbkd_mpi.model.graph import flatten_model
    from pbkd_mpi.model.selection import job_blocks
    from pbkd_mpi.model.students import build_student_model, layer_weights

    job = load_job(run / "job.toml")
    flat = flatten_model(teacher)
    students = {}
    for family in families:
        # The family for every block, no fallback: what that family alone would give.
        settings = [f"student.family={family}", f"student.fallback_family={family}",
                    "student.family_overrides=[]"]
        blocks = job_blocks(flat, load_job(run / "job.toml", settings))
        multiplier = job.student.depth_multiplier
        fresh = {b.name: layer_weights(build_student_model(b, multiplier)) for b in blocks}
        students[family] = assemble_student(flat, blocks, fresh, multiplier)
    return students


def measure(models: dict, input_shape, rounds: int) -> dict:
    runners = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            runners[name] = {"tflite": tflite_runner(model, Path(folder), name),
                             "keras": keras_runner(model)}
        inputs = {batch: np.random.default_rng(0).uniform(
            size=(batch, *input_shape)).astype(np.float32) for batch in (1, 32)}
        figures = {name: {} for name in models}
        for key, runtime, batch in MEASURES:
            x = inputs[batch]
            times = {name: [] for name in models}
            for round_index in range(WARMUP + rounds):
                for name in models:
                    started = time.perf_counter()
                    runners[name][runtime](x)
                    if round_index >= WARMUP:
                        times[name].append(time.perf_counter() - started)
            for name in models:
                figures[name][key] = 1000.0 * statistics.median(times[name])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--families", default="", help="comma-separated student families")
    args = parser.parse_args()
    import keras

    report = json.loads((args.run / "report.json").read_text())
    teacher_file = Path(report["teacher"].get("file") or report["teacher"]["source"])
    if not teacher_file.is_absolute() or not teacher_file.exists():
        teacher_file = args.run / teacher_file.name
    teacher = keras.saving.load_model(teacher_file)
    models = {"teacher": teacher,
              "student": keras.saving.load_model(args.run / "student.keras")}
    families = [f for f in args.families.split(",") if f]
    models |= {f"family_{name}": model
               for name, model in family_students(args.run, teacher, families).items()}
    figures = measure(models, tuple(teacher.input_shape[1:]), args.rounds)
    for name, row in figures.items():
        print(json.dumps({"model": name, "params": int(models[name].count_params()),
                          **{k: round(v, 4) for k, v in row.items()}}))

    def ratios(name):
        return {key: round(figures[name][key] / figures["teacher"][key], 3)
                for key, _, _ in MEASURES}
    print(json.dumps({**ratios("student"), "rounds": args.rounds,
                      "families": {name: ratios(f"family_{name}") for name in families}}))


if __name__ == "__main__":
    main()
