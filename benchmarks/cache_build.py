"""Activation cache build with 2 ranks vs 1 rank, and what each compression costs.

Each build runs tests/mpi/cache_driver.py under mpiexec: every rank makes the same seeded,
untrained demo teacher (32x32 images, widths 16,16,32,32,64,64) and the demo data (8,000
images: 7,200 training, 800 validation), then writes its round-robin share of the 512-sample
shards; rank 0 stitches. The time is from the moment every rank is set up (TensorFlow
imported, teacher traced) to the stitched file, the best of 2 runs.

`speedup` = 1 rank / 2 ranks, each rank with 1 intra-op thread (the tool's worker ranks
get the node's cores divided among them). `speedup_vs_2_threads` compares with 1 rank
given both cores, the best a single process can do here. Per compression (2 ranks): build
seconds, bytes on disk, and seconds to read every boundary of the training set once,
sequentially, in 256-sample slices (from the page cache: the file was just written).
Prints one JSON object, last line.

    python benchmarks/cache_build.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "mpi" / "cache_driver.py"
DEMO = ["--train", "8000", "--image", "32", "--widths", "16,16,32,32,64,64",
        "--shard", "512"]


def build(ranks: int, threads: int, out: Path, compression: str = "none") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = ["mpiexec", "-n", str(ranks), sys.executable, str(DRIVER), str(out), *DEMO,
               "--threads", str(threads), "--compression", compression]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def best(ranks: int, threads: int, out: Path, repeats: int = 2) -> dict:
    return min((build(ranks, threads, out) for _ in range(repeats)),
               key=lambda r: r["seconds"])


def read_seconds(path: Path) -> float:
    import h5py

    started = time.perf_counter()
    with h5py.File(path, "r") as f:
        for name in f["train"]:
            data = f["train"][name]
            for start in range(0, data.shape[0], 256):
                data[start:start + 256]
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pbkd-cache-build-") as tmp:
        out = Path(tmp) / "cache"
        one = best(1, 1, out)
        one_two_threads = best(1, 2, out)
        two = best(2, 1, out)
        compression = {"none": {"build_s": two["seconds"], "bytes": two["bytes"],
                                "read_train_s": read_seconds(out / "activations.h5")}}
        for kind in ("lzf", "gzip"):
            result = build(2, 1, out, kind)
            compression[kind] = {"build_s": result["seconds"], "bytes": result["bytes"],
                                 "read_train_s": read_seconds(out / "activations.h5")}
    print(json.dumps({
        "speedup": one["seconds"] / two["seconds"],
        "speedup_vs_2_threads": one_two_threads["seconds"] / two["seconds"],
        "one_rank_s": one["seconds"],
        "one_rank_2_threads_s": one_two_threads["seconds"],
        "two_ranks_s": two["seconds"],
        "samples": two["samples"],
        "shards": two["shards"],
        "bytes": two["bytes"],
        "compression": compression,
    }))


if __name__ == "__main__":
    main()
