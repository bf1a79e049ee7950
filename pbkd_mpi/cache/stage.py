"""The cache stage of a run: size it, then build it on the computing ranks, or choose
recompute mode.

Rank 0 estimates the cache per boundary, prints it, checks the disk, and (cache mode, no
complete cache with this fingerprint) runs the collective phase "cache": every worker, and
rank 0 when it computes too (Coordinator.compute_ranks), uses the teacher and the data
(checked against rank 0's hashes) to write its round-robin share of the shards
(build.build_shards); rank 0 then stitches them. The result is what block tasks need to
read their pairs (a reader.DataSource).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pbkd_mpi.cache.build import build_shards, cache_bytes, stitch
from pbkd_mpi.cache.layout import (CacheOptions, cache_path, check_disk, estimate_bytes,
                                   fingerprint_for, incomplete_reason, part_counts, plan_shards,
                                   shard_bytes, size_lines)
from pbkd_mpi.cache.reader import DataSource, load_teacher_and_data
from pbkd_mpi.errors import UserError
from pbkd_mpi.model.graph import boundaries
from pbkd_mpi.model.logits import logit_boundary
from pbkd_mpi.mpi import phases


@dataclass(frozen=True)
class BuildRequest:
    """What each building rank needs to build its shards (the phase's payload)."""

    names: tuple
    path: str
    fingerprint: str
    options: CacheOptions
    teacher_fingerprint: str
    seed: int


@dataclass
class CacheStage:
    path: str
    fingerprint: str
    source: DataSource
    info: dict


def cache_boundaries(teacher, blocks) -> list[str]:
    """The tensors to cache: each block's input and output, and the teacher's logit
    boundary (distillation and fine-tuning read its soft targets from the cache)."""
    return list(dict.fromkeys([*boundaries(blocks), logit_boundary(teacher)]))


def _build_rank_shards(teacher, dataset, request: BuildRequest, rank: int, size: int, check, log=None):
    return build_shards(teacher, dataset, list(request.names), Path(request.path),
                        request.fingerprint, request.options, rank, size, request.seed,
                        check=check, log=log)


def build_shards_on_worker(context, request: BuildRequest, comm, check) -> dict:
    """A worker's part of the cache phase: its shards, from the teacher file and data."""
    teacher, dataset = load_teacher_and_data(
        context.teacher_file, request.teacher_fingerprint, context.job.data,
        context.data_fingerprint, context.job.run.seed)
    try:
        return _build_rank_shards(teacher, dataset, request, comm.Get_rank(), comm.Get_size(), check)
    finally:
        load_teacher_and_data.cache_clear()  # cache mode: nothing reads them again here


def prepare_cache(job, teacher, teacher_fingerprint: str, teacher_file: str, dataset, names,
                  run_dir, coordinator, log) -> CacheStage:
    """Rank 0: the cache stage. `coordinator` runs the build phase on its computing ranks
    (None: rank 0 builds alone). `teacher_file`: what workers load in recompute mode."""
    config = job.cache
    options = CacheOptions.from_config(config)
    samples = len(dataset.y_train) * (1 + config.views) + len(dataset.y_val)
    sizes = estimate_bytes(teacher, names, samples, config.dtype)
    mode = config.mode
    fingerprint = fingerprint_for(teacher_fingerprint, dataset, names, options,
                                  job.data.scale, job.run.seed,
                                  mode="recompute" if mode == "recompute" else "cache")
    path = cache_path(run_dir, fingerprint)
    source = DataSource(mode="cache", memory_budget_bytes=config.memory_budget_mb << 20,
                        views=config.views, seed=job.run.seed, augment=options.augment)
    info = {"mode": mode, "dtype": config.dtype, "compression": config.compression,
            "views": config.views, "estimated_bytes": sum(sizes.values()),
            "estimated_bytes_by_boundary": sizes}
    if mode != "recompute":
        log("cache estimate:\n" + "\n".join(size_lines(sizes, samples, config.dtype)))
    complete = mode != "recompute" and incomplete_reason(path, fingerprint) is None
    if mode != "recompute" and not complete:
        present = shard_bytes(path)
        try:
            check_disk(run_dir, sizes, samples, config.dtype, config.views, present)
        except UserError:
            if mode != "auto":
                raise
            log("cache: the estimate does not fit the disk; recompute mode instead")
            mode = "recompute"
            fingerprint = fingerprint_for(teacher_fingerprint, dataset, names, options,
                                          job.data.scale, job.run.seed, mode="recompute")
    if mode == "recompute":
        info.update(mode="recompute", path=None, reused=False, bytes=0)
        return CacheStage("", fingerprint, DataSource(
            mode="recompute", views=config.views, seed=job.run.seed, augment=options.augment,
            teacher_file=str(teacher_file), teacher_fingerprint=teacher_fingerprint, data=job.data,
            data_fingerprint=dataset.fingerprint()), info)
    info["mode"] = "cache"
    if complete:
        info.update(path=str(path), reused=True, bytes=cache_bytes(path))
        return CacheStage(str(path), fingerprint, source, info)
    request = BuildRequest(tuple(names), str(path), fingerprint, options, teacher_fingerprint,
                           job.run.seed)
    if coordinator is None:
        built = {0: _build_rank_shards(teacher, dataset, request, 0, 1, None, log.detail)}
    elif (ranks := coordinator.compute_ranks) is not None:  # the workers alone
        built = coordinator.run_collective(phases.CACHE, request, ranks=ranks)
    else:
        built = coordinator.run_collective(
            phases.CACHE, request,
            lambda check: _build_rank_shards(teacher, dataset, request, 0,
                                             coordinator.comm.Get_size(), check, log.detail))
    built = {rank: shards for rank, shards in built.items() if shards is not None}
    stitched = stitch(teacher, dataset, names, path, fingerprint, options)
    total = len(plan_shards(part_counts(dataset, config.views), config.shard_samples))
    info.update(path=str(path), reused=False, bytes=stitched["bytes"],
                shards={"total": total,
                        "built": sum(s["built"] for s in built.values()),
                        "reused": sum(s["reused"] for s in built.values())},
                build_seconds_by_rank={rank: s["seconds"] for rank, s in sorted(built.items())})
    return CacheStage(str(path), fingerprint, source, info)
