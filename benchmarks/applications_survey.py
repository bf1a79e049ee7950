"""Every keras.applications constructor planned at every granularity: blocks, or the error.

Each model is built without weights at SIZE px with 10 classes and planned as `plan` does
with the job defaults (separable students, low-rank fallback, depth multiplier 2), at
`layer`, `block` and `stage` granularity, and once more at `block` with a parameter target
of 0.3. Per model and granularity it prints one JSON line: the number of blocks, the
families chosen, the replaced-parameter ratio (student over teacher, in blocks), the share
of the network's parameters inside blocks, the largest block's share, the smallest
student ratio, the warnings, or the error's type and message. The last line sums it up:
`{"models": n, "plans": n, "errors": n, "unwarned_over_share": n, "target_ratios": {...}}`.

With `--choose`, each granularity is also planned as `plan` does with the job defaults:
the latency objective chooses each block's student among its candidates (the teacher's
own block included), each timed alone on TFLite and Keras; the line adds how many blocks
were timed (`timed_blocks`: blocks with equal candidates are timed once), how many had
candidates, how many keep the teacher's block and the seconds, or `choose_error`.
`--rounds 1` times each candidate once (every candidate built, folded, converted and run:
the mechanics, without the cost of stable medians).

The full loop takes long on two cores (the largest models have hundreds of millions of
parameters), so it is a benchmark; tests/test_architectures.py covers one model of each
kind of architecture.

    python benchmarks/applications_survey.py [--size 64] [--only MobileNet,NASNetMobile]
    python benchmarks/applications_survey.py --size 96 --choose --rounds 1
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRANULARITIES = ("layer", "block", "stage")
MULTIPLIER = 2
MAX_SHARE, MIN_RATIO, TARGET = 0.9, 0.02, 0.3


def constructors() -> dict:
    import keras

    return {name: fn for name, fn in sorted(vars(keras.applications).items())
            if inspect.isfunction(fn) and name[0].isupper()}


def survey_one(model, granularity, target=None) -> dict:
    from pbkd_mpi.model.selection import block_table_of, plan_warnings, select_blocks

    started = time.perf_counter()
    try:
        blocks = select_blocks(model, granularity, MULTIPLIER, target=target,
                               max_share=MAX_SHARE)
    except Exception as error:  # the survey reports every failure, whatever its type
        return {"error": type(error).__name__, "message": str(error)[:300]}
    table = block_table_of(blocks, MULTIPLIER)
    totals = table["totals"]
    shares = [b.teacher_params / totals["teacher_params"] for b in blocks]
    warnings = plan_warnings(blocks, MULTIPLIER, MAX_SHARE, MIN_RATIO)
    families = {}
    for block in blocks:
        families[block.family] = families.get(block.family, 0) + 1
    return {
        "blocks": len(blocks), "families": families,
        "params_ratio": round(totals["student_params"] / totals["teacher_params"], 3),
        "in_blocks": round(totals["teacher_params"] / model.count_params(), 3),
        "largest_share": round(max(shares), 3),
        "smallest_student_ratio": round(min(r["params_ratio"] for r in table["blocks"]), 4),
        "all_smaller": all(r["params_ratio"] < 1 for r in table["blocks"]),
        "unwarned_over_share": sum(1 for s in shares if s > MAX_SHARE) > sum(
            1 for w in warnings if "of the parameters in blocks" in w),
        "warnings": len(warnings), "seconds": round(time.perf_counter() - started, 1),
    }


def choose_one(model, granularity) -> dict:
    """`plan`'s choice of students with the job defaults at `granularity`."""
    from pbkd_mpi.config import load_job
    from pbkd_mpi.model.choice import TEACHER, choose_students
    from pbkd_mpi.model.selection import job_blocks

    job = load_job(None, [])
    started = time.perf_counter()
    try:
        choice = choose_students(model, job_blocks(model, job, granularity), job, "survey",
                                 None, lambda message: None)
    except Exception as error:  # the survey reports every failure, whatever its type
        return {"choose_error": type(error).__name__, "choose_message": str(error)[:300]}
    rows = choice.record["blocks"]
    return {"timed_blocks": choice.record["timed_blocks"],
            "with_candidates": sum(1 for row in rows if len(row["candidates"]) > 1),
            "kept_teacher": sum(1 for row in rows if row["candidates"][0]["family"] == TEACHER),
            "choose_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated constructor names")
    parser.add_argument("--choose", action="store_true",
                        help="also choose the students as `plan` does (latency, timed)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="with --choose: time each candidate this many rounds")
    args = parser.parse_args()
    from pbkd_mpi.mpi.devices import import_tensorflow

    import_tensorflow()
    import keras

    if args.rounds:
        from pbkd_mpi.model import block_timing

        block_timing.WARMUP_ROUNDS = 0
        block_timing.MIN_ROUNDS = block_timing.MAX_ROUNDS = args.rounds

    wanted = set(filter(None, args.only.split(",")))
    summary = {"models": 0, "plans": 0, "errors": 0, "unwarned_over_share": 0,
               "not_all_smaller": 0, "target_ratios": {}, "choose_errors": 0}
    for name, build in constructors().items():
        if wanted and name not in wanted:
            continue
        keras.utils.clear_session()
        gc.collect()
        try:
            model = build(weights=None, input_shape=(args.size, args.size, 3), classes=10)
        except Exception as error:  # a constructor that refuses this input size
            print(json.dumps({"model": name, "build_error": str(error)[:200]}), flush=True)
            continue
        summary["models"] += 1
        runs = [(g, None) for g in GRANULARITIES] + [("block", TARGET)]
        for granularity, target in runs:
            row = {"model": name, "granularity": granularity, "target": target,
                   **survey_one(model, granularity, target)}
            if args.choose and target is None and "error" not in row:
                row.update(choose_one(model, granularity))
                summary["choose_errors"] += int("choose_error" in row)
            print(json.dumps(row), flush=True)
            if "error" in row:
                summary["errors"] += 1
                continue
            summary["plans"] += 1
            summary["unwarned_over_share"] += int(row["unwarned_over_share"])
            summary["not_all_smaller"] += int(not row["all_smaller"])
            if target is not None:
                summary["target_ratios"][name] = row["params_ratio"]
        del model
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
