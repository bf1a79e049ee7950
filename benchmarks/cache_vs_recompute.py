"""Total distillation time with the activation cache vs recomputing the teacher per batch.

For two untrained teachers on the demo data at 32x32 (3,600 training, 400 validation
samples), every block task is trained with train_block (2 epochs, batch 64) twice:

  cache      the cache is built first (one process, float16, no compression), then each
             task reads its pairs with the cache reader; time = build + all tasks
  recompute  each task runs the teacher from the image up to its block on every batch
             (cache.mode = "recompute", the method's original way); time = all tasks

`ratio_*` = recompute time / cache time (above 1: the cache wins). Teachers: `demo`, the
built-in demo teacher (6 convs, widths 16..64), and `deep`, VGG16's 13-conv, 5-stage layout
at widths 16..64 (pbkd_mpi.teacher.build_vgg_deep where it exists, else built here the same
way). Loading the teacher file and the data once per process is left out of both times.
The process is pinned to one core with one TensorFlow thread, as each of two workers is on
this 2-core machine. Prints one JSON object, last line.

    python benchmarks/cache_vs_recompute.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_WIDTHS = (16, 16, 32, 32, 64, 64)
DEEP_WIDTHS = (16, 16, 24, 24, 32, 32, 32, 48, 48, 48, 64, 64, 64)
TRAIN_IMAGES = 4000  # before the 10% validation split


def deep_teacher(input_shape, num_classes):
    from pbkd_mpi.model import teacher

    if hasattr(teacher, "build_vgg_deep"):
        return teacher.build_vgg_deep(input_shape, num_classes, DEEP_WIDTHS)
    # VGG16's layout: a pool wherever the width changes (4 pools inside, 13 convs).
    pool_after = [i for i in range(1, len(DEEP_WIDTHS)) if DEEP_WIDTHS[i] != DEEP_WIDTHS[i - 1]]
    import keras
    from keras import layers

    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, width in enumerate(DEEP_WIDTHS, start=1):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        if i in pool_after:
            x = layers.MaxPooling2D(name=f"pool{pool_after.index(i) + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="vgg_deep")


def compare(teacher, data_config, dataset, tmp: Path) -> dict:
    from pbkd_mpi.cache.layout import CacheOptions, fingerprint_for
    from pbkd_mpi.cache.build import build_cache
    from pbkd_mpi.cache.reader import DataSource, load_teacher_and_data
    from pbkd_mpi.config import DistillConfig
    from pbkd_mpi.model.graph import boundaries, find_blocks, flatten_model
    from pbkd_mpi.model.students import initial_weights
    from pbkd_mpi.keys import model_fingerprint
    from pbkd_mpi.distill.train_block import BlockTask, train_block

    teacher_file = tmp / f"{teacher.name}.keras"
    teacher.save(teacher_file)
    flat = flatten_model(teacher)
    blocks = find_blocks(flat)
    names = boundaries(blocks)
    teacher_fp = model_fingerprint(flat)
    options = CacheOptions()
    fingerprint = fingerprint_for(teacher_fp, dataset, names, options, "unit", 0)
    path = tmp / f"{teacher.name}-activations.h5"
    config = DistillConfig(epochs=2, batch_size=64, patience=3)
    recompute = DataSource(mode="recompute", teacher_file=str(teacher_file),
                           teacher_fingerprint=teacher_fp, data=data_config,
                           data_fingerprint=dataset.fingerprint())
    load_teacher_and_data(recompute.teacher_file, teacher_fp, data_config,
                          dataset.fingerprint(), 0)  # once per process, not timed

    def distill(source, cache_path) -> dict:
        seconds = {}
        for block in blocks:
            task = BlockTask(block, str(cache_path), fingerprint, config, seed=0,
                             estimated_cost=1.0, depth_multiplier=2,
                             initial_weights=initial_weights(block, flat, 2), source=source)
            started = time.perf_counter()
            train_block(task)
            seconds[block.name] = time.perf_counter() - started
        return seconds

    started = time.perf_counter()
    build_cache(flat, dataset, names, path, fingerprint, options=options)
    build_s = time.perf_counter() - started
    cached = distill(DataSource(), path)
    recomputed = distill(recompute, "")
    cache_s = build_s + sum(cached.values())
    return {"convs": sum(1 for layer in flat.layers if layer.name.startswith("conv")),
            "blocks": len(blocks), "cache_s": cache_s, "cache_build_s": build_s,
            "recompute_s": sum(recomputed.values()),
            "ratio": sum(recomputed.values()) / cache_s,
            "per_block_cache_s": cached, "per_block_recompute_s": recomputed}


def main() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from pbkd_mpi.mpi.devices import configure_tensorflow

    configure_tensorflow(1, 0, inter_threads=1)
    import keras

    from pbkd_mpi.config import DataConfig
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.model.teacher import build_vgg_demo

    data_config = DataConfig(demo_train=TRAIN_IMAGES, demo_test=100)
    dataset = load_dataset(data_config, seed=0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="pbkd-recompute-") as tmp:
        keras.utils.set_random_seed(1)
        demo = build_vgg_demo(dataset.image_shape, dataset.num_classes, DEMO_WIDTHS)
        results["demo"] = compare(demo, data_config, dataset, Path(tmp))
        keras.utils.set_random_seed(1)
        deep = deep_teacher(dataset.image_shape, dataset.num_classes)
        results["deep"] = compare(deep, data_config, dataset, Path(tmp))
    print(json.dumps({"ratio_demo": results["demo"]["ratio"],
                      "ratio_deep": results["deep"]["ratio"],
                      "epochs": 2, "batch_size": 64, "train_samples": len(dataset.y_train),
                      **results}))


if __name__ == "__main__":
    main()
