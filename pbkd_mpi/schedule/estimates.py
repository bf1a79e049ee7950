"""profile.json and the cost model that turns it into the schedule's task estimates (pure).

profiling.py measures, per block, training steps, evaluation and cache reads on the
workers. From those and the task's shape (samples, batch, epochs):

    seconds(1) = setup_s + read_s + epochs x (steps_per_epoch x seconds_per_step
                                              + eval_s_per_epoch) + final_eval_s

A task trained data-parallel on k workers (each a shard of every global batch, gradients
averaged by allreduce; pbkd_mpi/mpi/data_parallel.py) keeps the global batch, so each worker's
step has batch / k samples plus one allreduce of the student's weights:

    seconds(k) = setup_s + read_s + (epochs x eval_s_per_epoch + final_eval_s) / k
                 + epochs x steps_per_epoch x (fixed_step_s + per_sample_step_s x batch / k
                                               + allreduce_s(k, param_bytes))

with the step split into a fixed part and a per-sample part by timing two batch sizes, and
allreduce_s(k, b) = 2 ceil(log2 k) latency + 2 (k - 1) / k x b x seconds_per_byte from an
allreduce timed on this run's ranks (`allreduce` in profile.json; a model beyond the ranks
measured, labelled so). When no measurement exists, costs come from FLOP counts
(`method` says so) and only their order means anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pbkd_mpi import atomic
from pbkd_mpi.errors import UserError
from pbkd_mpi.schedule.scheduler import TaskEstimate

PROFILE_VERSION = 1


def allreduce_s(allreduce: dict | None, k: int, nbytes: int) -> float:
    if k <= 1:
        return 0.0
    if not allreduce:
        raise ValueError("a split estimate needs a measured allreduce (profile['allreduce'])")
    rounds = math.ceil(math.log2(k))
    return (2 * rounds * allreduce["latency_s"]
            + 2 * (k - 1) / k * nbytes * allreduce["seconds_per_byte"])


def split_seconds(entry: dict, k: int, allreduce: dict | None) -> float:
    """Estimated seconds of one block task on k workers (see the module docstring)."""
    evaluation = entry["epochs"] * entry["eval_s_per_epoch"] + entry["final_eval_s"]
    fixed = entry["setup_s"] + entry["read_s"]  # every worker opens and loads the data
    if k == 1:
        return (fixed + evaluation
                + entry["epochs"] * entry["steps_per_epoch"] * entry["seconds_per_step"])
    step = (entry["fixed_step_s"] + entry["per_sample_step_s"] * entry["batch_size"] / k
            + allreduce_s(allreduce, k, entry["param_bytes"]))
    return fixed + evaluation / k + entry["epochs"] * entry["steps_per_epoch"] * step


def task_estimates(profile: dict, workers: int) -> list[TaskEstimate]:
    """The schedule's view of a profile on `workers` workers: seconds on 1..k workers,
    where k stops at `workers`, at the batch size (no worker gets an empty piece), and
    where no allreduce was measured (splitting then is not offered)."""
    out = []
    for name, entry in profile["blocks"].items():
        if "estimated_s" not in entry:
            raise UserError(f"profile block {name!r} has no estimated_s: expected an entry "
                            f"written by pbkd_mpi.profile, received keys {sorted(entry)}.")
        splittable = profile.get("allreduce") and "fixed_step_s" in entry
        most = min(workers, entry.get("batch_size", 1)) if splittable else 1
        seconds = [entry["estimated_s"]] + [split_seconds(entry, k, profile["allreduce"])
                                            for k in range(2, most + 1)]
        out.append(TaskEstimate(name, tuple(seconds)))
    return out


COMPUTE_KEYS = ("seconds_per_step", "fixed_step_s", "per_sample_step_s", "eval_s_per_epoch",
                "final_eval_s")  # what a faster or slower processor changes; reads do not


def scaled_profile(profile: dict, factor: float) -> dict:
    """`profile` with every block's compute (training steps and evaluation) `factor` times
    as long, its reads, setup and the allreduce as they were: how the schedule fares on a
    processor that much slower (factor > 1) or faster, against the same network and disk."""
    blocks = {}
    for name, entry in profile["blocks"].items():
        entry = {**entry, **{k: entry[k] * factor for k in COMPUTE_KEYS if k in entry}}
        if "seconds_per_step" in entry:
            entry["estimated_s"] = split_seconds(entry, 1, None)
        else:  # a FLOP estimate: all of it is compute
            entry["estimated_s"] = entry["estimated_s"] * factor
        blocks[name] = entry
    return {**profile, "method": f"{profile.get('method')}; compute x {factor:g}",
            "blocks": blocks}


def load_profile(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    try:
        profile = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"No profile at {str(path)!r}: expected RUN_DIR/profile.json, "
                        f"written by a run before distillation.") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{str(path)!r} is not valid JSON: {exc}.") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("blocks"), dict) \
            or not profile["blocks"]:
        raise UserError(f"{str(path)!r} is not a profile: expected an object with a "
                        f"non-empty \"blocks\" table, received "
                        f"{type(profile).__name__} with keys {sorted(profile)[:8] if isinstance(profile, dict) else []}.")
    return profile


def save_profile(run_dir, profile: dict) -> Path:
    path = Path(run_dir) / "profile.json"
    atomic.write_text(path, json.dumps(profile, indent=2) + "\n")
    return path
