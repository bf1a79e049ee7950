"""A parameter target shared uniformly vs by kernel spectra, on one teacher, in one invocation.

Runs the job twice under `mpiexec -n RANKS` with `student.target_params = TARGET`, once
with `student.allocation = "uniform"` and once with `"spectrum"`, each in its own run
directory, the teacher given as a file so that both distil the same one (by default the
demo run's: `runs/demo`). Per allocation it prints one JSON line: the replaced-parameter
ratio, the sum over blocks of the low-rank start's truncation error (the energy the
ranks leave out of the teacher's kernels), the mean relative validation MSE of the blocks
after distillation, validation and test accuracy merged and fine-tuned, and the widths.
The last line compares them: `{"uniform": {...}, "spectrum": {...}, "delta_val_merged":
..., "delta_test_finetuned": ...}` (spectrum minus uniform).

    python benchmarks/target_allocation.py [--teacher runs/demo/teacher-*.keras]
        [--job jobs/demo.toml] [--target 0.3] [--ranks 3] [--out /tmp/allocation]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(ranks: int, job: str, run_dir: Path, teacher: str, target: float, allocation: str):
    command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "pbkd_mpi", "run", job,
               "--run-dir", str(run_dir), "--quiet", "--set", f"teacher.source={teacher}",
               "--set", f"student.target_params={target}",
               "--set", f"student.allocation={allocation}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "report.json").read_text())


def summary(report: dict, teacher_file: str, target: float, allocation: str, job: str) -> dict:
    from pbkd_mpi.config import load_job
    from pbkd_mpi.model.allocation import truncation_error
    from pbkd_mpi.model.selection import job_blocks
    from pbkd_mpi.model.teacher import load_model_file

    teacher = load_model_file(teacher_file)
    spec = load_job(job, [f"student.target_params={target}",
                          f"student.allocation={allocation}"])
    blocks = job_blocks(teacher, spec)
    multiplier = spec.student.depth_multiplier
    low_rank = [b for b in blocks if b.family == "low_rank" and b.kind == "conv"]
    rows = report["blocks"]
    student = report["student"]
    return {
        "allocation": allocation,
        "params_ratio": round(sum(r["student_params"] for r in rows)
                              / sum(r["teacher_params"] for r in rows), 4),
        "truncation_error_sum": round(sum(truncation_error(b, teacher, multiplier)
                                          for b in low_rank), 4),
        "mean_relative_val_mse": round(sum(r["val_mse"] / max(r["target_variance"], 1e-12)
                                           for r in rows) / len(rows), 4),
        "val_merged": student["val_accuracy_merged"],
        "val_finetuned": student["val_accuracy_finetuned"],
        "test_merged": student["accuracy_merged"],
        "test_finetuned": student["accuracy_finetuned"],
        "teacher_test": report["teacher"]["accuracy"],
        "widths": {b.name: b.width for b in blocks},
        "wall_s": report["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--job", default=str(REPO / "jobs" / "demo.toml"))
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--out", default="/tmp/allocation")
    args = parser.parse_args()
    teacher = args.teacher or (sorted(glob.glob(str(REPO / "runs/demo/teacher-*.keras")))
                               or [None])[0]
    if teacher is None:
        sys.exit("No teacher: pass --teacher FILE, or run the demo first (runs/demo).")
    results = {}
    for allocation in ("uniform", "spectrum"):
        run_dir = Path(args.out) / allocation
        report = run(args.ranks, args.job, run_dir, teacher, args.target, allocation)
        results[allocation] = summary(report, teacher, args.target, allocation, args.job)
        print(json.dumps(results[allocation]), flush=True)
    uniform, spectrum = results["uniform"], results["spectrum"]
    print(json.dumps({
        "uniform": {k: v for k, v in uniform.items() if k != "widths"},
        "spectrum": {k: v for k, v in spectrum.items() if k != "widths"},
        "delta_val_merged": round(spectrum["val_merged"] - uniform["val_merged"], 4),
        "delta_val_finetuned": round(spectrum["val_finetuned"] - uniform["val_finetuned"], 4),
        "delta_test_finetuned": round(spectrum["test_finetuned"] - uniform["test_finetuned"],
                                      4),
    }))


if __name__ == "__main__":
    main()
