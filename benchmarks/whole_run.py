"""The whole run after the teacher with 1 worker vs 2 workers, measured in one invocation.

Runs the job (default: the demo's) end to end twice under mpiexec, with 1 worker
(`-n 2`) and with 2 workers (`-n 3`), each in a fresh run directory, the teacher given as
a file so both reuse the same trained one (by default the demo run's, `runs/demo`) and
everything else - cache, profile, distillation, acceptance, chained pass, assembly,
fine-tuning, evaluation, exports - is computed again. The figure per run is the sum of its
phases after the teacher (report.json `phases`, without `load` and `teacher`).

Both runs do the same work: fine-tuning runs all of its epochs (`finetune.patience` set to
`finetune.epochs`). Its early stop depends on the number of fine-tuning ranks (each
normalises with its own piece's BN statistics), and one run stopping after 4 epochs
while the other trains 10 would be counted as a speedup (as it was before this rule: the
2-worker run stopped at 4 and 6 epochs, the 1-worker run at 10). Prints one
JSON line per run (its phases) and, last, `{"speedup": 1-worker seconds / 2-worker
seconds, "sequential_share_2w": ..., "sequential_share_1w": ..., ...}`: the sequential
share is the part of the time after the teacher spent in phases that do not shrink with
workers (schedule/whole_run.py).

    python benchmarks/whole_run.py [--teacher FILE] [--job jobs/demo.toml] [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BEFORE = ("load", "teacher")  # what a run spends before its teacher exists


def run(workers: int, job: str, run_dir: Path, teacher: str, epochs: int
        ) -> tuple[dict, float]:
    """(report.json, the command's wall seconds) of one run with `workers` workers."""
    command = ["mpiexec", "-n", str(workers + 1), sys.executable, "-m", "pbkd_mpi", "run", job,
               "--run-dir", str(run_dir), "--quiet", "--fresh",  # nothing of a run reused
               "--set", f"teacher.source={teacher}", "--set", f"finetune.patience={epochs}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "report.json").read_text()), time.perf_counter() - started


def main() -> None:
    from pbkd_mpi.config import load_job
    from pbkd_mpi.schedule.whole_run import sequential_share

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--job", default=str(REPO / "jobs" / "demo.toml"))
    parser.add_argument("--out", default="/tmp/whole_run")
    args = parser.parse_args()
    teacher = args.teacher or (sorted(glob.glob(str(REPO / "runs/demo/teacher-*.keras")))
                               or [None])[0]
    if teacher is None:
        sys.exit("No teacher: pass --teacher FILE, or run the demo first (runs/demo).")
    epochs = max(1, load_job(args.job).finetune.epochs)
    rows = {}
    for workers in (1, 2):
        report, command_s = run(workers, args.job, Path(args.out) / f"{workers}w", teacher,
                                epochs)
        phases = {name: round(s, 1) for name, s in report["phases"].items()}
        rows[workers] = {
            "workers": workers, "phases_s": phases,
            "after_teacher_s": round(sum(s for n, s in report["phases"].items()
                                         if n not in BEFORE), 1),
            "command_s": round(command_s, 1),
            "sequential_share": round(sequential_share(report["phases"],
                                                       report.get("chained")), 3),
            "test_finetuned": report["student"]["accuracy_finetuned"],
            "finetune_epochs": report["finetune"]["epochs"],
            "finetune_ranks": report["finetune"]["ranks"],
        }
        print(json.dumps(rows[workers]), flush=True)
    one, two = rows[1], rows[2]
    print(json.dumps({
        "speedup": round(one["after_teacher_s"] / two["after_teacher_s"], 3),
        "sequential_share_2w": two["sequential_share"],
        "sequential_share_1w": one["sequential_share"],
        "after_teacher_s": {"1w": one["after_teacher_s"], "2w": two["after_teacher_s"]},
        "command_speedup": round(one["command_s"] / two["command_s"], 3),
    }))


if __name__ == "__main__":
    main()
