"""Finished block tasks on disk: written as each result arrives, reused by the next run.

One `.npz` per task under RUN/blocks/, named by the block and a key that hashes
everything the result depends on (the activation cache's fingerprint, which covers the
teacher's weights and the data; the block; the student family; the training settings and
the seed). A run that finds a readable file under its task's name skips that task. Files
are written under a temporary name and renamed, so a killed run leaves only whole files.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from pbkd_mpi.atomic import atomic_path
from pbkd_mpi.keys import task_key

_WEIGHT_PREFIX = "weights/"


def result_path(run_dir: Path, task) -> Path:
    return Path(run_dir) / "blocks" / f"{task.block.name}-{task_key(task)}.npz"


def progress_path(run_dir, task) -> Path:
    """Where the worker checkpoints the task while it trains (see checkpoint.py)."""
    return result_path(run_dir, task).with_suffix(".progress.npz")


def save_result(path: Path, result: dict, info: dict) -> None:
    """`result` as train_block returns it; `info` what rank 0 knows (rank, seconds)."""
    arrays = {
        f"{_WEIGHT_PREFIX}{layer}/{index}": array
        for layer, weights in result["weights"].items()
        for index, array in enumerate(weights)
    }
    meta = {key: value for key, value in result.items() if key != "weights"}
    meta["info"] = info
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)


def load_result(path: Path) -> tuple[dict, dict] | None:
    """(result, info) of a finished task, or None when there is no whole file to reuse."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            weights: dict[str, list] = {}
            for name in sorted(archive.files, key=_weight_order):
                if name.startswith(_WEIGHT_PREFIX):
                    layer = name[len(_WEIGHT_PREFIX):].rsplit("/", 1)[0]
                    weights.setdefault(layer, []).append(archive[name])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    info = meta.pop("info")
    meta["weights"] = weights
    return meta, info


def _weight_order(name: str):
    layer, _, index = name.rpartition("/")
    return (layer, int(index)) if index.isdigit() else (name, -1)
