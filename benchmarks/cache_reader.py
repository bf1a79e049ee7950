"""Block training fed by the HDF5 cache reader vs fed by in-memory float32 arrays.

The demo teacher (untrained, 32x32 images, widths 16,16,32,32,64,64) on the demo data
(7,200 training samples) is cached in float16 without compression. Two of its block tasks
are trained: `conv2`, the largest boundary (32x32x16 in and out, 64 KB a sample), and
`conv6`, the smallest (8x8x64, 16 KB), batch 64, four ways:

  memory    model.fit on float32 NumPy arrays, shuffled by Keras: the baseline
  memory_untuned  the same arrays through tf.data (shuffle, batch, prefetch) with
            autotuning off, as the reader runs: a second baseline, because Keras's
            arrays path keeps tf.data's autotuning, whose end-of-epoch waits
            (docs/cache.md) slow it on one core and so flatter the ratios against it
  streamed  cache_reader with a memory budget of 0: shuffled chunk windows read from the
            file during training, the path of caches larger than RAM
  in_ram    cache_reader with the default budget: the block's arrays loaded as stored
            (float16), shuffled whole

Each way has its own model (same start), traced and warmed up by one epoch first. Then
ROUNDS rounds: in each, each way trains EPOCHS epochs, the four interleaved, so a slow
spell of the machine hits a round's runs alike. A round's ratio is reader samples/s over
memory samples/s of that round; `ratio_small` / `ratio_large` are the median over the
rounds of the streamed ratio (`*_in_ram` of the in-RAM one, `*_vs_untuned` against the
second baseline); `rounds` lists each round's.
The process is pinned to one core with one TensorFlow thread, as each of two workers is on
this 2-core machine, so the reads compete with the training for the same core. The file
was just written, so reads come from the page cache, not the disk.
Prints one JSON object, last line.

    python benchmarks/cache_reader.py
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EPOCHS, BATCH, ROUNDS = 2, 64, 5


def timed(fit, samples: int, epoch_log: list) -> float:
    """Training samples/s of EPOCHS epochs of `fit` over `samples` samples each; each
    epoch's seconds (Keras's epoch begin to end) are appended to `epoch_log`."""
    import keras

    class EpochSeconds(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_log.append(round(time.perf_counter() - self.began, 3))

    started = time.perf_counter()
    history = fit(epochs=EPOCHS, callbacks=[EpochSeconds()])
    return samples * len(history.epoch) / (time.perf_counter() - started)


def main() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from pbkd_mpi.mpi.devices import configure_tensorflow

    configure_tensorflow(1, 0, inter_threads=1)
    import keras
    import numpy as np
    import tensorflow as tf

    from pbkd_mpi.cache.layout import CacheOptions, fingerprint_for
    from pbkd_mpi.cache.reader import read_pair
    from pbkd_mpi.cache.build import build_cache
    from pbkd_mpi.cache.reader import PREFETCH_BATCHES, CachedPairs, CacheStore, without_autotune
    from pbkd_mpi.config import DataConfig
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.model.graph import boundaries, find_blocks
    from pbkd_mpi.model.students import build_student_model, initial_weights
    from pbkd_mpi.model.teacher import build_vgg_demo

    dataset = load_dataset(DataConfig(), seed=0)
    keras.utils.set_random_seed(1)
    teacher = build_vgg_demo(dataset.image_shape, dataset.num_classes, (16, 16, 32, 32, 64, 64))
    blocks = {block.name: block for block in find_blocks(teacher)}
    names = boundaries(blocks.values())
    options = CacheOptions()
    fingerprint = fingerprint_for("bench", dataset, names, options, "unit", 0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="pbkd-cache-reader-") as tmp:
        path = Path(tmp) / "activations.h5"
        build_cache(teacher, dataset, names, path, fingerprint, options=options)
        for label, name in (("large", "conv2"), ("small", "conv6")):
            block = blocks[name]
            start = initial_weights(block, teacher, 2)

            def model():
                keras.utils.set_random_seed(0)
                student = build_student_model(block, 2)
                for layer, arrays in start.items():
                    student.get_layer(layer).set_weights(arrays)
                student.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
                return student

            x, y = (a.astype(np.float32) for a in read_pair(
                path, fingerprint, "train", block.input_boundary, block.output_boundary))
            fits, stores = {}, []
            for mode, budget in (("memory", None), ("memory_untuned", None), ("streamed", 0),
                                 ("in_ram", 2 << 30)):
                student = model()
                if mode == "memory":
                    fits[mode] = functools.partial(student.fit, x, y, batch_size=BATCH,
                                                   shuffle=True, verbose=0)
                elif mode == "memory_untuned":
                    arrays = without_autotune(
                        tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
                        .batch(BATCH).prefetch(PREFETCH_BATCHES))
                    fits[mode] = functools.partial(student.fit, arrays, shuffle=False,
                                                   verbose=0)
                else:
                    stores.append(CacheStore(path, fingerprint, ["train"], block.input_boundary,
                                             block.output_boundary, memory_budget_bytes=budget))
                    source = CachedPairs(stores[-1], ["train"], BATCH, seed=0)
                    fits[mode] = functools.partial(student.fit, source.dataset(),
                                                   shuffle=False, verbose=0)
                fits[mode](epochs=1)  # warm-up: tracing, first reads
            epoch_s = {mode: [] for mode in fits}
            rounds = [{mode: timed(fit, len(x), epoch_s[mode]) for mode, fit in fits.items()}
                      for _ in range(ROUNDS)]
            for store in stores:
                store.close()
            results[label] = {"block": name, "sample_bytes": int(x[0].size + y[0].size) * 2,
                              "rounds": rounds, "epoch_s": epoch_s, **{
                                  f"ratio{suffix}{versus}": statistics.median(
                                      r[mode] / r[baseline] for r in rounds)
                                  for mode, suffix in (("streamed", ""), ("in_ram", "_in_ram"))
                                  for baseline, versus in (("memory", ""),
                                                           ("memory_untuned", "_vs_untuned"))}}
    print(json.dumps({
        "ratio_small": results["small"]["ratio"], "ratio_large": results["large"]["ratio"],
        "ratio_small_in_ram": results["small"]["ratio_in_ram"],
        "ratio_large_in_ram": results["large"]["ratio_in_ram"],
        **{f"ratio_{label}{suffix}_vs_untuned": results[label][f"ratio{suffix}_vs_untuned"]
           for label in ("small", "large") for suffix in ("", "_in_ram")},
        "rounds": ROUNDS, "epochs": EPOCHS, "batch_size": BATCH,
        "train_samples": len(dataset.y_train), **results,
    }))


if __name__ == "__main__":
    main()
