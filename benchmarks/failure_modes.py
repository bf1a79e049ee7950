"""What the job does, and how fast it ends, for each bad input and each failure at run time.

    python benchmarks/failure_modes.py [--ranks 3] [--only NAME,...]

Every case runs `mpiexec -n RANKS python -m pbkd_mpi run jobs/tiny.toml ...` for real (no
mocks) and records the exit code, the wall time until every rank was gone, and the first
`error:`/`warning:`/`stopped:` line the user saw. Run-time failures (a block that raises,
a NaN loss, a killed or hung worker, a preemption signal) start from a run directory whose
teacher and cache a warm-up run already made, so the fault lands while blocks train; each
is followed by a second, clean run in the same directory, and the table says what it
reused. Prints a Markdown table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_JOB = REPO / "jobs" / "tiny.toml"
TIMEOUT_S = 240


def run(ranks, args, env=None):
    command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "pbkd_mpi", "run",
               str(TINY_JOB), *map(str, args)]
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                cwd=REPO)
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as timeout:
        code, stdout, stderr = "timeout", timeout.stdout or "", timeout.stderr or ""
    seconds = time.monotonic() - started
    said = [line for line in (stderr + stdout).splitlines()
            if re.match(r"(\[[\d:]+\] )?(error|warning|stopped):", line)]
    return {"exit_code": code, "seconds": round(seconds, 1),
            "message": said[0][:300] if said else "", "stdout": stdout}


def _npz(path, x, y):
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return path


def bad_inputs(work: Path, ranks: int) -> dict:
    """name -> (args, extra env, ranks)."""
    import keras

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    (work / "junk.keras").write_bytes(b"this is not a zip archive")

    @keras.saving.register_keras_serializable(package="failure_modes")
    class Subclassed(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            return self.dense(keras.ops.mean(x, axis=(1, 2)))

    model = Subclassed()
    model(np.zeros((1, 16, 16, 3), np.float32))
    model.save(work / "subclassed.keras")
    teacher = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3),
                                keras.layers.Flatten(), keras.layers.Dense(4)])
    teacher.save(work / "teacher.keras")
    big = rng.integers(0, 255, size=(40, 20, 20, 3), dtype=np.uint8)
    nan = images.astype(np.float32)
    nan[3, 1, 1, 1] = np.nan
    (work / "empty").mkdir()
    (work / "bad_images" / "a").mkdir(parents=True)
    (work / "bad_images" / "b").mkdir(parents=True)
    for index in range(3):
        keras.utils.save_img(work / "bad_images" / "a" / f"{index}.png", images[index])
        keras.utils.save_img(work / "bad_images" / "b" / f"{index}.png", images[index + 3])
    (work / "bad_images" / "b" / "broken.png").write_bytes(b"\x89PNG truncated")
    (work / "blocker").write_text("a file where a directory should be")
    own = ["--set", f"teacher.source={work / 'teacher.keras'}"]
    return {
        "missing teacher file": (["--set", f"teacher.source={work / 'absent.keras'}"], ranks),
        "teacher file not a Keras model": (["--set", f"teacher.source={work / 'junk.keras'}"],
                                           ranks),
        "subclassed teacher": (["--set", f"teacher.source={work / 'subclassed.keras'}"], ranks),
        "image shape does not fit the teacher": (
            [*own, "--set", f"data.source={_npz(work / 'big.npz', big, labels)}",
             "--set", "data.image_size=[20, 20]"], ranks),
        "labels outside the class range": (
            [*own, "--set", f"data.source={_npz(work / 'labels.npz', images, labels + 3)}"],
            ranks),
        "missing data directory": (["--set", f"data.source={work / 'nowhere'}"], ranks),
        "empty data directory": (["--set", f"data.source={work / 'empty'}"], ranks),
        "unreadable image (bad_images = refuse)": (
            ["--set", f"data.source={work / 'bad_images'}", "--set", "data.bad_images=refuse"],
            ranks),
        "NaN in the input data": (
            [*own, "--set", f"data.source={_npz(work / 'nan.npz', nan, labels)}"], ranks),
        "unknown job-file key": (["--set", "distill.epoch=3"], ranks),
        "wrong type": (["--set", "distill.epochs=three"], ranks),
        "out-of-range value": (["--set", "distill.learning_rate=-1"], ranks),
        "-np 1 (no worker rank)": ([], 1),
        "unwritable run directory": (["--run-dir", work / "blocker" / "run"], ranks),
    }


def runtime_failures(work: Path, ranks: int) -> list[dict]:
    base = work / "runtime"
    args = ["--run-dir", base, "--set", "distill.epochs=8", "--set", "tasks.silence_limit_s=10"]
    warm = run(ranks, args)  # the teacher and the cache, once
    rows = [{"case": "warm-up run (teacher, cache)", **warm}]
    faults = {
        "a block raises (every attempt)": "raise:conv2",
        "NaN loss in a block": "nan:conv3",
        "worker SIGKILLed mid-distillation": "kill:1:3",
        "worker hangs (SIGSTOP, silent)": "hang:1:3",
        "SIGUSR1 on rank 0 (preemption)": "signal:USR1:10",
    }
    for case, fault in faults.items():
        shutil.rmtree(base / "blocks", ignore_errors=True)
        failed = run(ranks, args, env={"PBKD_FAULT": fault})
        saved = sorted(p.name.split("-")[0] for p in (base / "blocks").glob("*.npz")
                       if ".progress" not in p.name)
        resumed = run(ranks, args)
        reused = re.search(r"reusing (\d+) finished block", resumed["stdout"])
        rows.append({"case": case, "fault": fault, **failed,
                     "blocks_saved": saved,
                     "resume_exit_code": resumed["exit_code"],
                     "resume_reused_blocks": int(reused.group(1)) if reused else 0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated: bad-input, runtime")
    options = parser.parse_args()
    parts = set(options.only.split(",")) if options.only else {"bad-input", "runtime"}
    from pbkd_mpi.mpi.devices import import_tensorflow

    import_tensorflow()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pbkd-failures-") as tmp:
        work = Path(tmp)
        if "bad-input" in parts:
            for case, (args, ranks) in bad_inputs(work, options.ranks).items():
                if "--run-dir" not in args:
                    args = [*args, "--run-dir", work / "runs" / re.sub(r"\W+", "-", case)]
                rows.append({"case": case, **run(ranks, args)})
        if "runtime" in parts:
            rows.extend(runtime_failures(work, options.ranks))
    print("| case | exit code | seconds to exit | what the user saw | resumed run |")
    print("|---|---|---|---|---|")
    for row in rows:
        resume = (f"exit {row['resume_exit_code']}, reused {row['resume_reused_blocks']} "
                  f"block(s)" if "resume_exit_code" in row else "")
        print(f"| {row['case']} | {row['exit_code']} | {row['seconds']} | "
              f"{row['message'][:160].replace('|', '/')} | {resume} |")
    for row in rows:
        row.pop("stdout", None)
    print(json.dumps({"ranks": options.ranks, "cases": rows}))


if __name__ == "__main__":
    main()
