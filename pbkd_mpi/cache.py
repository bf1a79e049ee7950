"""Teacher activations at block boundaries, computed once and kept in HDF5.

One file per run and fingerprint: `cache/activations-<fingerprint>.h5` with a group per
split (`train`, `val`) and a dataset per boundary (samples along the first axis). It is
written under a temporary name and renamed when complete, and marked with the fingerprint
of the teacher's weights, the data and the boundaries, so a finished cache is reused and a
foreign, partial or corrupt one is never read as if it were this run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from .errors import UserError
from .graph import MODEL_INPUT

SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk: whole batches per read, few chunks per batch
FORMAT_VERSION = 1


def cache_fingerprint(teacher_fingerprint: str, data_fingerprint: str, names, dtype: str) -> str:
    text = json.dumps(
        {
            "teacher": teacher_fingerprint,
            "data": data_fingerprint,
            "boundaries": list(names),
            "dtype": dtype,
            "format": FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def estimate_bytes(teacher, names, samples: int, dtype: str) -> dict[str, int]:
    """Bytes each boundary takes in the cache for `samples` samples (train + val)."""
    itemsize = np.dtype(dtype).itemsize
    sizes = {}
    for name in names:
        tensor = teacher.inputs[0] if name == MODEL_INPUT else teacher.get_layer(name).output
        sizes[name] = int(np.prod(tensor.shape[1:])) * itemsize * samples
    return sizes


def _human(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def check_disk(run_dir: Path, sizes: dict[str, int], samples: int, dtype: str) -> None:
    """Refuse before writing when the run directory's disk cannot hold the cache."""
    needed = sum(sizes.values())
    where = Path(run_dir)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed <= 0.95 * free:  # leave room for the student, the report and the logs
        return
    largest = ", ".join(f"{name} {_human(size)}" for name, size in
                        sorted(sizes.items(), key=lambda item: -item[1])[:3])
    options = ['cache.dtype = "float16" halves it'] if dtype == "float32" else []
    options += ["fewer samples", 'blocks.granularity = "stage" (fewer boundaries to store)',
                "a run directory on a larger disk (--run-dir)"]
    raise UserError(
        f"The activation cache needs {_human(needed)} ({len(sizes)} boundaries x {samples} "
        f"samples, {dtype}; largest: {largest}) but {str(run_dir)!r} has {_human(free)} free. "
        f"Options: {'; '.join(options)}."
    )


def cache_path(run_dir: Path, fingerprint: str) -> Path:
    return Path(run_dir) / "cache" / f"activations-{fingerprint}.h5"


def is_complete(path: Path, fingerprint: str) -> bool:
    """True only for a readable cache written to the end for this fingerprint."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("fingerprint") == fingerprint and bool(f.attrs.get("complete"))
    except (OSError, KeyError):
        return False


def build_cache(teacher, dataset, names, path: Path, fingerprint: str, dtype: str,
                batch_size: int = 256) -> dict:
    """Write the boundaries `names` for the training and validation splits; reuse a
    complete cache with the same fingerprint. Returns a summary for the report."""
    import keras

    path = Path(path)
    if is_complete(path, fingerprint):
        return {"path": str(path), "reused": True, "bytes": path.stat().st_size}
    path.parent.mkdir(parents=True, exist_ok=True)
    layer_names = [name for name in names if name != MODEL_INPUT]
    extractor = keras.Model(
        teacher.inputs, [teacher.get_layer(name).output for name in layer_names]
    )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = fingerprint
            f.attrs["boundaries"] = json.dumps(list(names))
            f.attrs["complete"] = False
            for split in SPLITS:
                _write_split(f.create_group(split), extractor, layer_names, names,
                             getattr(dataset, f"x_{split}"), dtype, batch_size)
            f.attrs["complete"] = True
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(path), "reused": False, "bytes": path.stat().st_size}


def _write_split(group, extractor, layer_names, names, x, dtype, batch_size):
    shapes = {MODEL_INPUT: x.shape[1:]}
    shapes.update({name: tuple(out.shape[1:]) for name, out in
                   zip(layer_names, extractor.outputs)})
    datasets = {}
    for name in names:
        sample_bytes = int(np.prod(shapes[name])) * np.dtype(dtype).itemsize
        # Chunks of equal rows: a last, partial chunk would still take a whole chunk's disk.
        chunks = -(-len(x) // max(1, CHUNK_BYTES // sample_bytes))
        rows = max(1, -(-len(x) // chunks))
        datasets[name] = group.create_dataset(
            name, shape=(len(x), *shapes[name]), dtype=dtype, chunks=(rows, *shapes[name])
        )
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        outputs = extractor.predict_on_batch(batch) if layer_names else []
        if len(layer_names) == 1:
            outputs = [outputs]
        values = dict(zip(layer_names, outputs))
        values[MODEL_INPUT] = batch
        for name in names:
            datasets[name][start:start + len(batch)] = np.asarray(values[name], dtype=dtype)


def read_pair(path: Path, fingerprint: str, split: str, input_name: str, output_name: str):
    """A block's (input, target) arrays of one split, loaded into memory."""
    if not is_complete(path, fingerprint):
        raise UserError(
            f"The activation cache {str(path)!r} is missing, incomplete or belongs to another "
            f"run (fingerprint {fingerprint} expected)."
        )
    with h5py.File(path, "r") as f:
        return f[split][input_name][()], f[split][output_name][()]
