"""The run directory: created and checked writable, owned by one job, cleared on request.

Everything a resumed run reuses lives here, keyed by fingerprints; but a directory that
holds a different job's run is refused outright (unless --fresh): silently mixing two jobs'
teachers, caches and blocks in one place is how results get confused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pbkd_mpi import atomic
from pbkd_mpi.config import Job, load_job
from pbkd_mpi.errors import UserError

JOB_FILE = "job.toml"
# What a run's results depend on; fine-tuning, retries and threads may change between tries.
IDENTITY_SECTIONS = ("teacher", "data", "blocks", "student", "distill", "cache")
# Keys of those sections that may change all the same: their results have keys of their
# own (a chained task's key covers its epochs and inputs, distill/chain.py), and the parallel
# phase's blocks do not depend on them.
MAY_CHANGE = {("distill", "chained_epochs"), ("distill", "head_weight")}
# What --fresh removes: the tool's own files only, never anything else in the directory.
OWN_ENTRIES = ("job.toml", "blocks", "cache", "logs", "tb", "report.json", "report.md",
               "student.keras", "timeline.png", "block_costs.png", "block_losses.png",
               "finetune.png", "student-assembled.keras", "profile.json", "student_savedmodel",
               "student_float32.tflite", "student_int8.tflite", "chain", "finetune")


def prepare_run_dir(job: Job, fresh: bool = False) -> Path:
    run_dir = Path(job.run.dir)
    if fresh:
        clear(run_dir)
    else:
        check_same_job(run_dir, job)
    try:
        (run_dir / "blocks").mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"Cannot write to the run directory {str(run_dir)!r}: {exc.strerror}. Choose another "
            f"with --run-dir or run.dir."
        ) from None
    write_job_toml(job, run_dir / JOB_FILE)
    return run_dir


def differences(previous: Job, job: Job) -> list[str]:
    old, new = previous.to_dict(), job.to_dict()
    keys = [(s, k) for s in IDENTITY_SECTIONS for k in new[s] if (s, k) not in MAY_CHANGE]
    keys.append(("run", "seed"))
    return [f"{s}.{k} was {json.dumps(old[s].get(k))}, is now {json.dumps(new[s][k])}"
            for s, k in keys if old[s].get(k) != new[s][k]]


def check_same_job(run_dir: Path, job: Job) -> None:
    path = run_dir / JOB_FILE
    if not path.exists():
        return
    try:
        previous = load_job(path)
    except UserError as exc:
        raise UserError(
            f"The run directory {str(run_dir)!r} holds a job file this version cannot read "
            f"({exc}). Use another --run-dir, or --fresh to clear it and start over."
        ) from None
    changed = differences(previous, job)
    if changed:
        raise UserError(
            f"The run directory {str(run_dir)!r} holds a run of a different job: "
            f"{'; '.join(changed)}. Its teacher, cache and blocks do not belong to this job. "
            f"Use another --run-dir, or --fresh to clear it and start over."
        )


def clear(run_dir: Path) -> None:
    for name in OWN_ENTRIES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for teacher in run_dir.glob("teacher-*.keras"):
        teacher.unlink()


def job_toml(job: Job) -> str:
    """The resolved job as TOML: every key, paths absolute (what RUN/job.toml holds)."""
    lines = []
    for section, values in job.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_job_toml(job: Job, path: Path) -> None:
    atomic.write_text(path, job_toml(job))
