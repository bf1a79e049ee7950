"""Keys and fingerprints: what a stored result depends on, hashed.

A run reuses a file of an earlier run (a trained teacher, cache shards, a block's result, a
fine-tuned student) only when the key in its name or attributes is the one it would write
itself, so a key must cover everything the file's numbers depend on, and nothing else.
Every key is the start of a SHA-256: 16 hexadecimal digits (12 for the built-in teacher's
file name, which runs already on disk carry).

- `model_fingerprint`: a model's architecture and weights (the teacher; caches, tasks and
  fine-tunings depend on it);
- `arrays_fingerprint`: named arrays with their shapes and dtypes (a data set);
- `weights_digest`: a model's weights alone (do two ranks hold the same student?);
- `student_blocks_key`: the replaced blocks' weights and widths (a chained block's input);
- `task_key`, `finetune_key`, `json_key`: results keyed by their settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

KEY_DIGITS = 16


def json_key(value, digits: int = KEY_DIGITS) -> str:
    """Key of a JSON-able value (sequences that JSON lacks, such as tuples, as lists)."""
    text = json.dumps(value, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


def model_fingerprint(model) -> str:
    """A Keras model's configuration and every weight."""
    digest = hashlib.sha256(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:KEY_DIGITS]


def arrays_fingerprint(named_arrays) -> str:
    """`(name, array)` pairs, in order: names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, array in named_arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{name}{array.shape}{array.dtype}".encode())
        digest.update(array.data)
    return digest.hexdigest()[:KEY_DIGITS]


def weights_digest(model) -> str:
    """A model's weights alone, in order (not its configuration)."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:KEY_DIGITS]


def student_blocks_key(block_weights: dict[str, dict], multipliers: dict[str, int]) -> str:
    """The replaced blocks' weights and depth multipliers: what a chained block's input
    depends on besides the teacher and the data (the cache's fingerprint covers those)."""
    digest = hashlib.sha256()
    for name in sorted(block_weights):
        digest.update(f"{name}:{multipliers.get(name, 1)}".encode())
        for layer in sorted(block_weights[name]):
            digest.update(layer.encode())
            for array in block_weights[name][layer]:
                digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:KEY_DIGITS]


# Raised when a student family's layers or weight layout change, so that a result saved
# for the old layout is trained again instead of loaded into the new one. 2: the separable
# student tiles its input instead of using Keras' depth_multiplier (2026-12).
STUDENT_LAYOUT = 2


def task_key(task) -> str:
    """A block task's result (distill/train_block.BlockTask). A parallel-phase task's key
    leaves `chained_epochs` and `head_weight` out (its result does not depend on them, so
    runs that differ only there share it); a chained task (distill/chain.py) adds what its
    input depends on, `input_digest`, and its head loss if it has one; its epochs are its
    config's `epochs`."""
    distill = dataclasses.asdict(task.config)
    for chained_only in ("chained_epochs", "head_weight"):
        distill.pop(chained_only, None)
    chained = {"input_digest": task.input_digest} if task.input_digest else {}
    if task.head_loss is not None:
        chained["head_loss"] = task.head_loss.key()
    return json_key({
        "cache": task.cache_fingerprint,
        "block": task.block.to_dict(),
        "distill": distill,
        "depth_multiplier": task.depth_multiplier,
        "student_layout": STUDENT_LAYOUT,
        "seed": task.seed,
        **chained,
    })


def finetune_key(student, config, data_fingerprint: str, teacher_fingerprint: str,
                 seed: int, ranks: int) -> str:
    """What a fine-tuned student depends on: the assembled student's weights, the
    fine-tuning settings, the data, the teacher (its logits), the seed, and the number of
    ranks (each rank's share of every batch, and so the order of the sums)."""
    return json_key({"student": weights_digest(student), "finetune": dataclasses.asdict(config),
                     "data": data_fingerprint, "teacher": teacher_fingerprint,
                     "seed": seed, "ranks": ranks})
