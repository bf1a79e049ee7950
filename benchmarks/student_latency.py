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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEASURES = (("tflite_b1", "tflite", 1), ("tflite_b32", "tflite", 32),
            ("keras_b32", "keras-cpu", 32))


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
    """{model name: {measure: median ms}}, the models timed interleaved per measure (the
    choice of students times its candidates the same way: model/block_timing.py)."""
    from pbkd_mpi.model.block_timing import time_models

    figures = {name: {} for name in models}
    for key, target, batch in MEASURES:
        times = time_models(list(models.values()), input_shape, target, batch, rounds)
        for name, ms in zip(models, times):
            figures[name][key] = ms
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
