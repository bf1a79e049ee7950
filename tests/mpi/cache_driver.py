"""Build an activation cache on every rank of MPI.COMM_WORLD, without the task protocol.

    mpiexec -n 2 python tests/mpi/cache_driver.py OUT_DIR [--train N] [--image HW] ...

Every rank makes the same seeded, untrained VGG-style teacher and the same demo data,
writes its round-robin share of the shards (cache_build.build_shards), rank 0 stitches
them and prints one JSON line: the build's wall time (from the moment every rank is set
up to the stitched file), shard counts and, with --verify, the largest difference between
the stitched cache and the teacher's own outputs. Used by tests/mpi/test_cache_resume.py
and benchmarks/cache_build.py. Waits use pbkd_mpi.collectives (no spinning).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--widths", default="8,8,16,16")
    parser.add_argument("--shard", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()

    from mpi4py import MPI

    from pbkd_mpi.mpi import collectives
    from pbkd_mpi.mpi.devices import configure_tensorflow

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    configure_tensorflow(args.threads, rank, inter_threads=1)
    import keras

    from pbkd_mpi.cache.layout import CacheOptions, fingerprint_for
    from pbkd_mpi.cache.reader import read_pair
    from pbkd_mpi.cache.build import build_shards, stitch
    from pbkd_mpi.config import DataConfig
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.model.graph import boundaries, find_blocks
    from pbkd_mpi.model.teacher import build_vgg_demo
    from pbkd_mpi.keys import model_fingerprint

    dataset = load_dataset(DataConfig(image_size=(args.image, args.image),
                                      demo_train=args.train, demo_test=100), seed=0)
    keras.utils.set_random_seed(1)
    teacher = build_vgg_demo(dataset.image_shape, dataset.num_classes,
                             [int(w) for w in args.widths.split(",")])
    names = boundaries(find_blocks(teacher))
    options = CacheOptions(dtype=args.dtype, compression=args.compression,
                           shard_samples=args.shard)
    teacher_fp = model_fingerprint(teacher)
    fingerprint = fingerprint_for(teacher_fp, dataset, names, options, "unit", seed=0)
    path = Path(args.out) / "activations.h5"
    fingerprints = collectives.gather_objects(comm, (teacher_fp, dataset.fingerprint()))
    if rank == 0 and len(set(fingerprints)) != 1:
        raise SystemExit(f"ranks built different teachers or data: {fingerprints}")
    # Warm the teacher up (graph tracing) outside the timed build, as a long build amortises.
    keras.Model(teacher.inputs, teacher.get_layer(names[-1]).output).predict_on_batch(
        dataset.x_train[:8])
    collectives.barrier(comm)

    started = time.perf_counter()
    share = build_shards(teacher, dataset, names, path, fingerprint, options, rank, size)
    shares = collectives.gather_objects(comm, share)
    if rank == 0:
        stitched = stitch(teacher, dataset, names, path, fingerprint, options)
        seconds = time.perf_counter() - started
        report = {"ranks": size, "seconds": seconds, "samples": len(dataset.y_train)
                  + len(dataset.y_val), "bytes": stitched["bytes"],
                  "shards": stitched["shards"], "built": sum(s["built"] for s in shares),
                  "reused": sum(s["reused"] for s in shares)}
        if args.verify:
            probe = keras.Model(teacher.inputs, [teacher.get_layer(n).output
                                                 for n in names[1:]])
            expected = probe.predict(dataset.x_train, batch_size=256, verbose=0)
            report["max_relative_error"] = max(
                float(np.max(np.abs(read_pair(path, fingerprint, "train", n, n)[0]
                                    .astype(np.float32) - e)) / float(np.max(np.abs(e))))
                for n, e in zip(names[1:], expected))
        print(json.dumps(report), flush=True)
    collectives.barrier(comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
