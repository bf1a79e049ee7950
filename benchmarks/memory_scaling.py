"""Peak memory per rank against the data set's size: the whole pipeline on N and 4N images.

For each image size, a folder of JPEG files (train/ and test/, one subfolder per class, the
demo's generated shapes) is written for N and for 4N training images (test: N / 4), and
the whole run (teacher trained here, cache, profile, distillation, acceptance, chained
pass, fine-tuning, export) runs under `mpiexec -n 3` on each, with the epochs of every
phase cut to `--epochs` so that the sizes, not the epochs, set the time. Each run's
report.json gives every rank's peak RSS (the high-water mark over the run) and the wall time.

`rss_ratio` is the largest per-rank peak at 4N over the same at N (at the largest image
size); `peak_rss_mb` the largest per-rank peak of any run; `time_ratio` the 4N run's wall
time over the N run's. Prints one JSON object, last line.

    python benchmarks/memory_scaling.py [--n 4000] [--sizes 32,64] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_folder(root: Path, train: int, test: int, size: int, seed: int) -> None:
    """JPEG files of the demo's shapes under root/{train,test}/<class>/."""
    import tensorflow as tf

    from pbkd_mpi.data.demo import CLASS_NAMES, make_shapes

    for split, count, offset in (("train", train, 0), ("test", test, 1)):
        images, labels = make_shapes(count, (size, size), seed=seed + offset)
        for name in CLASS_NAMES:
            (root / split / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels)):
            path = root / split / CLASS_NAMES[label].replace(" ", "_") / f"{index:07d}.jpg"
            path.write_bytes(tf.io.encode_jpeg(image, quality=95).numpy())


def run_pipeline(data: Path, run_dir: Path, size: int, epochs: int) -> dict:
    settings = [f"data.source={data}", f"data.image_size=[{size}, {size}]",
                "data.scale=unit", f"teacher.train_epochs={epochs}",
                f"distill.epochs={epochs}", f"distill.chained_epochs={epochs}",
                f"finetune.epochs={epochs}", "export.tflite=none",
                "export.saved_model=false"]
    command = ["mpiexec", "-n", "3", sys.executable, "-m", "pbkd_mpi", "run", "--quiet",
               "--run-dir", str(run_dir)]
    for item in settings:
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the run on {data} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    per_rank = report["energy"]["per_rank"]
    peaks = [rank["peak_rss_mb"] for rank in per_rank]
    return {"wall_s": round(wall, 1), "peak_rss_mb_per_rank": [round(p) for p in peaks],
            "peak_rss_mb_by_phase": [{name: round(phase["peak_rss_mb"])
                                      for name, phase in rank["phases"].items()}
                                     for rank in per_rank],
            "phases_s": {k: round(v, 1) for k, v in report["phases"].items()},
            "accuracy_finetuned": report["student"]["accuracy_finetuned"],
            "memory_budget": report["memory_budget"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="training images of the small run")
    parser.add_argument("--sizes", default="32,64", help="image sizes, comma-separated")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every phase")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="pbkd-memory-scaling-") as tmp:
        for size in sizes:
            for count in (args.n, 4 * args.n):
                data = Path(tmp) / f"images-{size}-{count}"
                write_folder(data, count, max(100, count // 4), size, seed=count)
                result = run_pipeline(data, Path(tmp) / f"run-{size}-{count}", size,
                                      args.epochs)
                results[f"{size}px_{count}"] = result
                print(json.dumps({f"{size}px_{count}": result}), flush=True)
    largest = sizes[-1]
    small, large = (results[f"{largest}px_{c}"] for c in (args.n, 4 * args.n))
    print(json.dumps({
        "rss_ratio": max(large["peak_rss_mb_per_rank"]) / max(small["peak_rss_mb_per_rank"]),
        "peak_rss_mb": max(max(r["peak_rss_mb_per_rank"]) for r in results.values()),
        "time_ratio": large["wall_s"] / small["wall_s"],
        "n": args.n, "sizes": sizes, "epochs": args.epochs, "runs": results}))


if __name__ == "__main__":
    main()
