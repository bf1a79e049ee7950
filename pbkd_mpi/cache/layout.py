"""Teacher activations at block boundaries in HDF5: layout, fingerprint, size, validity.

On disk, for one fingerprint:

    cache/activations-<fp>.h5          the stitched file: a group per part (`train`, `val`,
                                       `train_v1`.. for augmented views) and a virtual
                                       dataset per boundary, samples along the first axis
    cache/activations-<fp>.shards/     the data: one HDF5 file per shard of samples,
                                       `<part>-<index>.h5`, written by one rank each

Shards have a fixed number of samples (`cache.shard_samples`), so the shard boundaries do
not depend on how many ranks build them and a resumed build reuses every complete shard
whatever the rank count. Every file is written under a temporary name, synced and renamed,
so a crash leaves no file that looks complete; each carries the fingerprint; datasets are
Fletcher-32 checksummed per chunk, so a corrupted chunk fails its read instead of feeding a
block wrong numbers. A virtual dataset would silently read a missing shard as fill values,
so the stitched file lists its shards and `is_complete` checks that each is there and ours.
Building is in build.py, reading in reader.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pbkd_mpi.data.augment import AugmentSpec
from pbkd_mpi.errors import UserError
from pbkd_mpi.keys import json_key
from pbkd_mpi.model.graph import boundary_tensor

SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk: whole batches per read, few chunks per batch
SHARD_SAMPLES = 512
FORMAT_VERSION = 2
COMPRESSIONS = ("none", "lzf", "gzip")
GZIP_LEVEL = 1  # higher levels shrink activations little more and cost far more time


@dataclass(frozen=True)
class CacheOptions:
    """How a cache is stored; everything here is part of the fingerprint."""

    dtype: str = "float16"
    compression: str = "none"
    shard_samples: int = SHARD_SAMPLES
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    @classmethod
    def from_config(cls, config) -> "CacheOptions":
        return cls(config.dtype, config.compression, config.shard_samples,
                   AugmentSpec(config.views, config.augment_flip, config.augment_crop,
                               config.augment_jitter))

    def dataset_options(self) -> dict:
        """h5py create_dataset keywords for the compression (shuffle helps lzf and gzip
        find the repeats in the bytes of fp16 and fp32 values)."""
        if self.compression == "lzf":
            return {"compression": "lzf", "shuffle": True}
        if self.compression == "gzip":
            return {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
        return {}


def cache_fingerprint(teacher_fingerprint: str, data_fingerprint: str, names, dtype: str,
                      *, compression: str = "none", preprocessing: str = "",
                      augment: AugmentSpec | None = None, shard_samples: int = SHARD_SAMPLES,
                      seed: int = 0, mode: str = "cache") -> str:
    """Keys the cache: the same value means the same numbers in the same files."""
    augment = augment or AugmentSpec()
    return json_key(
        {
            "teacher": teacher_fingerprint,
            "data": data_fingerprint,
            "preprocessing": preprocessing,
            "boundaries": list(names),
            "dtype": dtype,
            "compression": compression,
            # Views are drawn from the run's seed, so the seed matters once there are views.
            "augment": augment.to_dict() | ({"seed": seed} if augment.views else {}),
            "shard_samples": shard_samples,
            "mode": mode,
            "format": FORMAT_VERSION,
        })


def fingerprint_for(teacher_fingerprint, dataset, names, options: CacheOptions,
                    preprocessing: str, seed: int, mode: str = "cache") -> str:
    return cache_fingerprint(teacher_fingerprint, dataset.fingerprint(), names, options.dtype,
                             compression=options.compression, preprocessing=preprocessing,
                             augment=options.augment, shard_samples=options.shard_samples,
                             seed=seed, mode=mode)


# --- parts and shards ---------------------------------------------------------------------

def part_names(views: int) -> list[str]:
    """`train`, `val`, then one part per augmented view of the training set."""
    return [*SPLITS, *(f"train_v{v}" for v in range(1, views + 1))]


def part_source(part: str) -> tuple[str, int]:
    """(split, view) that a part holds."""
    if part.startswith("train_v"):
        return "train", int(part[len("train_v"):])
    return part, 0


def part_counts(dataset, views: int) -> dict[str, int]:
    return {part: len(getattr(dataset, f"y_{part_source(part)[0]}")) for part in part_names(views)}


def pair_bytes(block, item_bytes: int) -> int:
    """Bytes of one cached (input, target) pair of `block`."""
    return (int(np.prod(block.input_shape)) + int(np.prod(block.output_shape))) * item_bytes


@dataclass(frozen=True)
class Shard:
    part: str
    index: int
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return f"{self.part}-{self.index:05d}.h5"

    @property
    def samples(self) -> int:
        return self.stop - self.start


def plan_shards(counts: dict[str, int], shard_samples: int) -> list[Shard]:
    """Every shard of every part, in a fixed order that depends on the sizes only."""
    shards = []
    for part, count in counts.items():
        for index, start in enumerate(range(0, count, shard_samples)):
            shards.append(Shard(part, index, start, min(start + shard_samples, count)))
    return shards


def assigned(shards: list[Shard], rank: int, size: int) -> list[Shard]:
    """Round-robin: shards are equal, so every rank gets the same work within one shard."""
    return shards[rank::size]


def chunk_rows(rows: int, sample_shape, dtype: str) -> int:
    """Rows per chunk: about CHUNK_BYTES, and equal chunks, because a last partial chunk
    takes a whole chunk's disk."""
    sample_bytes = max(1, int(np.prod(sample_shape)) * np.dtype(dtype).itemsize)
    chunks = -(-rows // max(1, CHUNK_BYTES // sample_bytes))
    return max(1, -(-rows // chunks))


# --- paths and validity -------------------------------------------------------------------

def cache_path(run_dir: Path, fingerprint: str) -> Path:
    return Path(run_dir) / "cache" / f"activations-{fingerprint}.h5"


def shard_dir(path: Path) -> Path:
    """Where the shards of the stitched file `path` live (a sibling folder)."""
    path = Path(path)
    return path.with_name(path.stem + ".shards")


def shard_bytes(path: Path) -> int:
    """Disk used by the complete shards of the stitched file `path` (a temporary's name
    starts with a dot and also ends in .h5: atomic.temporary_name)."""
    folder = shard_dir(path)
    return sum(p.stat().st_size for p in folder.glob("[!.]*.h5")) if folder.exists() else 0


def boundary_shapes(teacher, names) -> dict[str, tuple]:
    return {name: tuple(boundary_tensor(teacher, name).shape[1:]) for name in names}


def check_shard(path: Path, shard: Shard, fingerprint: str, shapes: dict, dtype: str,
                deep: bool = False) -> str | None:
    """None for a complete shard of this cache; otherwise why it cannot be used. `deep`
    reads every value, so a corrupted chunk fails its checksum here."""
    try:
        with h5py.File(path, "r") as f:
            found = (f.attrs.get("fingerprint"), f.attrs.get("part"),
                     int(f.attrs.get("start", -1)), int(f.attrs.get("stop", -1)))
            expected = (fingerprint, shard.part, shard.start, shard.stop)
            if found != expected:
                return f"holds (fingerprint, part, start, stop) {found}, expected {expected}"
            for name, shape in shapes.items():
                if name not in f:
                    return f"has no dataset {name!r}"
                data = f[name]
                if data.shape != (shard.samples, *shape) or data.dtype != np.dtype(dtype):
                    return (f"dataset {name!r} is {data.shape} {data.dtype}, expected "
                            f"{(shard.samples, *shape)} {dtype}")
                if deep:
                    step = data.chunks[0]
                    for start in range(0, shard.samples, step):
                        data[start:start + step]
    except (OSError, KeyError, ValueError) as exc:
        return f"cannot be read ({str(exc).strip() or type(exc).__name__})"
    return None


def is_complete(path: Path, fingerprint: str) -> bool:
    return incomplete_reason(path, fingerprint) is None


def incomplete_reason(path: Path, fingerprint: str) -> str | None:
    """None for a stitched cache written to the end for this fingerprint whose shards are
    all present and ours; otherwise what is wrong."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("fingerprint") != fingerprint:
                return f"fingerprint {f.attrs.get('fingerprint')!r}, expected {fingerprint!r}"
            if not bool(f.attrs.get("complete")):
                return "not written to the end"
            files = json.loads(f.attrs["shards"])
    except (OSError, KeyError, ValueError) as exc:
        return f"cannot be read ({str(exc).strip() or type(exc).__name__})"
    folder = shard_dir(path)
    for name in files:
        try:
            with h5py.File(folder / name, "r") as shard:
                if shard.attrs.get("fingerprint") != fingerprint:
                    return f"shard {name} belongs to another cache"
        except OSError:
            return f"shard {name} is missing or unreadable"
    return None


def require_complete(path: Path, fingerprint: str) -> None:
    reason = incomplete_reason(path, fingerprint)
    if reason is not None:
        raise UserError(
            f"The activation cache {str(path)!r} is missing, incomplete or belongs to another "
            f"run (fingerprint {fingerprint} expected): {reason}."
        )


# --- size -----------------------------------------------------------------------------------

def estimate_bytes(teacher, names, samples: int, dtype: str) -> dict[str, int]:
    """Bytes each boundary takes in the cache for `samples` samples (all parts), before
    compression: the most it can take."""
    itemsize = np.dtype(dtype).itemsize
    return {name: int(np.prod(shape)) * itemsize * samples
            for name, shape in boundary_shapes(teacher, names).items()}


def human(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


_human = human


def size_lines(sizes: dict[str, int], samples: int, dtype: str) -> list[str]:
    """The estimate as printed before the build: each boundary, then the total."""
    lines = [f"  {name}: {human(size)}" for name, size in sizes.items()]
    lines.append(f"  total: {human(sum(sizes.values()))} ({len(sizes)} boundaries x {samples} "
                 f"samples, {dtype}, before compression)")
    return lines


def check_disk(run_dir: Path, sizes: dict[str, int], samples: int, dtype: str,
               views: int = 0, present: int = 0) -> None:
    """Refuse before writing when the run directory's disk cannot hold the cache.
    `present`: bytes of complete shards already on disk, which the build keeps."""
    needed = sum(sizes.values())
    where = Path(run_dir)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed - present <= 0.95 * free:  # leave room for the student, the report and the logs
        return
    largest = ", ".join(f"{name} {human(size)}" for name, size in
                        sorted(sizes.items(), key=lambda item: -item[1])[:3])
    options = ['cache.dtype = "float16" halves it'] if dtype == "float32" else []
    if views:
        options.append(f"fewer augmented views (cache.views = {views} now)")
    options += ["fewer samples", 'blocks.granularity = "stage" (fewer boundaries to store)',
                'cache.mode = "recompute" (no cache: each block task runs the teacher up to '
                'its block on every batch, slower but no disk)',
                "a run directory on a larger disk (--run-dir)"]
    raise UserError(
        f"The activation cache needs {human(needed)} ({len(sizes)} boundaries x {samples} "
        f"samples, {dtype}; largest: {largest}) but {str(run_dir)!r} has {human(free)} free. "
        f"Options: {'; '.join(options)}."
    )
