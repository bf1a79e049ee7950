"""What TensorFlow's oneDNN switches trade: a block's peak memory against its training time.

Each setting runs in a fresh process (the switches are read when TensorFlow starts): a
student block of the demo's first conv at 64 px (64x64x16 -> 64x64x16: depthwise 3x3,
pointwise 1x1, BN, ReLU, the separable family) trained with Keras' fit on 4,000 random
float32 pairs, batch 64, EPOCHS epochs after one warm-up epoch, on both cores. Figures:
the process's peak resident memory (ru_maxrss) and the timed epochs' seconds. Settings:

  default     oneDNN with its own allocator, which pools large buffers
  system_allocator  TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1: oneDNN's buffers from malloc
  no_onednn   TF_ENABLE_ONEDNN_OPTS=0: TensorFlow's own kernels

The settings run in turn, ROUNDS times, so a slow spell of the machine hits all of them;
per setting the median over rounds. `time_ratio` is a setting's time over the default's
of the same round (median). Prints one JSON object, last line.

    python benchmarks/onednn_memory.py [--rounds 3] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {
    "default": {},
    "system_allocator": {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"},
    "no_onednn": {"TF_ENABLE_ONEDNN_OPTS": "0"},
}


def train_once(epochs: int) -> dict:
    import resource
    import time

    import numpy as np
    import keras

    keras.utils.set_random_seed(0)
    shape = (64, 64, 16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, *shape)).astype("float32")
    y = np.maximum(rng.normal(size=(4000, *shape)), 0).astype("float32")
    inputs = keras.Input(shape)
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(inputs)
    h = keras.layers.Conv2D(16, 1, use_bias=False)(h)
    h = keras.layers.BatchNormalization()(h)
    model = keras.Model(inputs, keras.layers.ReLU()(h))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # traces the graph
    started = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mb": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(train_once(args.epochs)))
        return
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--inner", "--epochs", str(args.epochs)],
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}, capture_output=True,
                text=True, timeout=900, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    figures = {}
    for name, results in runs.items():
        ratios = [r["seconds"] / d["seconds"] for r, d in zip(results, runs["default"])]
        figures[name] = {"peak_mb": round(statistics.median(r["peak_mb"] for r in results)),
                         "seconds": round(statistics.median(r["seconds"] for r in results), 2),
                         "time_ratio": round(statistics.median(ratios), 2)}
    print(json.dumps({"rounds": args.rounds, "epochs": args.epochs, **figures}))


if __name__ == "__main__":
    main()
