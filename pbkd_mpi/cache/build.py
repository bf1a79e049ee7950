"""Building the activation cache: shards written by every building rank, stitched by one.

`build_shards` is one rank's share (the shards `rank::size` of a fixed shard list): it runs
the teacher only up to the boundaries the tasks need and writes each shard as its own HDF5
file. `stitch` then makes the one file that block training opens, with a virtual dataset per
part and boundary over the shards. No MPI in here: the phase that runs this on the building ranks
(stage.py), the benchmarks and the tests pass `rank` and `size` themselves.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np

from pbkd_mpi.atomic import atomic_path, stale_temporaries
from pbkd_mpi.cache.layout import (CacheOptions, FORMAT_VERSION, Shard, assigned, boundary_shapes,
                                   check_shard, chunk_rows, incomplete_reason, part_counts,
                                   part_source, plan_shards, shard_bytes, shard_dir)
from pbkd_mpi.data.augment import Views
from pbkd_mpi.model.evaluate import forward_batch
from pbkd_mpi.model.graph import MODEL_INPUT, boundary_tensor
from pbkd_mpi.mpi import faults



def _extractor(teacher, names):
    """The teacher cut at the needed boundaries: Keras computes only the layers these
    outputs depend on, so deep layers after the last boundary never run."""
    import keras

    layer_names = [name for name in names if name != MODEL_INPUT]
    if not layer_names:
        return None, []
    model = keras.Model(teacher.inputs, [boundary_tensor(teacher, n) for n in layer_names])
    return model, layer_names


def _part_images(dataset, views: Views | None, shard: Shard) -> np.ndarray:
    split, view = part_source(shard.part)
    if view:
        return views.images(view, slice(shard.start, shard.stop))
    return getattr(dataset, f"x_{split}")[shard.start:shard.stop]


def write_shard(path: Path, shard: Shard, images, extractor, layer_names, names, shapes,
                fingerprint: str, options: CacheOptions, batch_size: int,
                kill_midway: bool = False) -> int:
    """One shard file: written to a temporary name, synced, renamed. Returns its bytes."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"fingerprint": fingerprint, "part": shard.part,
                            "index": shard.index, "start": shard.start, "stop": shard.stop,
                            "boundaries": json.dumps(list(names)), "format": FORMAT_VERSION})
            datasets = {
                name: f.create_dataset(
                    name, shape=(shard.samples, *shapes[name]), dtype=options.dtype,
                    chunks=(chunk_rows(shard.samples, shapes[name], options.dtype),
                            *shapes[name]),
                    fletcher32=True, **options.dataset_options())
                for name in names
            }
            for start in range(0, shard.samples, batch_size):
                batch = np.asarray(images[start:start + batch_size], np.float32)
                outputs = extractor.predict_on_batch(batch) if extractor is not None else []
                if len(layer_names) == 1:
                    outputs = [outputs]
                values = dict(zip(layer_names, outputs))
                values[MODEL_INPUT] = batch
                for name in names:
                    datasets[name][start:start + len(batch)] = np.asarray(values[name],
                                                                          options.dtype)
                if kill_midway:  # PBKD_FAULT killwrite: die with half a shard on disk
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
    return path.stat().st_size


def build_shards(teacher, dataset, names, path: Path, fingerprint: str,
                 options: CacheOptions, rank: int = 0, size: int = 1, seed: int = 0,
                 check=None, log=None, batch_size: int | None = None) -> dict:
    """Write this rank's shards of the cache whose stitched file is `path`; keep every one
    that is already complete (read through, so a corrupt one is rebuilt). `check()` runs
    between shards (the phase passes its abort check); `log(message)` hears of rebuilds.
    Returns what this rank did."""
    started = time.perf_counter()
    batch_size = batch_size or forward_batch(teacher)
    folder = shard_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = boundary_shapes(teacher, names)
    shards = plan_shards(part_counts(dataset, options.augment.views), options.shard_samples)
    mine = assigned(shards, rank, size)
    views = Views(dataset.x_train, options.augment, seed) if options.augment.views else None
    extractor, layer_names = None, []
    built = reused = written = 0
    for count, shard in enumerate(mine, start=1):
        target = folder / shard.file_name
        for stale in stale_temporaries(target):  # left by a killed build
            stale.unlink(missing_ok=True)
        if target.exists():
            reason = check_shard(target, shard, fingerprint, shapes, options.dtype, deep=True)
            if reason is None:
                reused += 1
                continue
            if log is not None:
                log(f"cache shard {shard.file_name} is rebuilt: it {reason}")
        if extractor is None and any(n != MODEL_INPUT for n in names):
            extractor, layer_names = _extractor(teacher, names)
        written += write_shard(target, shard, _part_images(dataset, views, shard), extractor,
                               layer_names, names, shapes, fingerprint, options, batch_size,
                               kill_midway=faults.active("killwrite", f"{rank}:{count}"))
        built += 1
        if check is not None:
            check()
    return {"rank": rank, "shards": len(mine), "built": built, "reused": reused,
            "bytes_written": written, "seconds": time.perf_counter() - started}


def stitch(teacher, dataset, names, path: Path, fingerprint: str, options: CacheOptions) -> dict:
    """The file block training opens: per part, a virtual dataset per boundary over the
    shards, which must all be complete. Written to a temporary name and renamed."""
    path = Path(path)
    folder = shard_dir(path)
    shapes = boundary_shapes(teacher, names)
    counts = part_counts(dataset, options.augment.views)
    shards = plan_shards(counts, options.shard_samples)
    for shard in shards:
        reason = check_shard(folder / shard.file_name, shard, fingerprint, shapes, options.dtype)
        if reason is not None:
            raise RuntimeError(f"cannot stitch the activation cache: shard {shard.file_name} "
                               f"{reason}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"fingerprint": fingerprint, "complete": False,
                            "boundaries": json.dumps(list(names)),
                            "parts": json.dumps(counts), "format": FORMAT_VERSION,
                            "shards": json.dumps([s.file_name for s in shards])})
            for part, count in counts.items():
                group = f.create_group(part)
                for name in names:
                    layout = h5py.VirtualLayout(shape=(count, *shapes[name]),
                                                dtype=options.dtype)
                    for shard in (s for s in shards if s.part == part):
                        # A relative file name: HDF5 looks for it next to the stitched file,
                        # so the run directory can move.
                        layout[shard.start:shard.stop] = h5py.VirtualSource(
                            f"{folder.name}/{shard.file_name}", name,
                            shape=(shard.samples, *shapes[name]))
                    group.create_virtual_dataset(name, layout, fillvalue=np.nan)
            f.attrs["complete"] = True
    return {"path": str(path), "shards": len(shards),
            "bytes": sum((folder / s.file_name).stat().st_size for s in shards)
            + path.stat().st_size}


def build_cache(teacher, dataset, names, path: Path, fingerprint: str, dtype: str = "float16",
                batch_size: int | None = None, *, options: CacheOptions | None = None,
                seed: int = 0, log=None) -> dict:
    """The whole cache from one process: every shard, then the stitch. A complete cache
    with this fingerprint is reused as it is. Returns a summary for the report."""
    options = options or CacheOptions(dtype=dtype)
    path = Path(path)
    if incomplete_reason(path, fingerprint) is None:
        return {"path": str(path), "reused": True, "bytes": cache_bytes(path)}
    done = build_shards(teacher, dataset, names, path, fingerprint, options, 0, 1, seed,
                        log=log, batch_size=batch_size)
    info = stitch(teacher, dataset, names, path, fingerprint, options)
    return {"path": str(path), "reused": False, "bytes": info["bytes"],
            "shards": {"total": info["shards"], "built": done["built"],
                       "reused": done["reused"]}}


def cache_bytes(path: Path) -> int:
    """The stitched file and its shards, on disk."""
    return Path(path).stat().st_size + shard_bytes(path)
