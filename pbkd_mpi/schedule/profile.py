"""Measured task costs: profile.json, and the model that turns it into schedule estimates.

Before distillation every worker rank times, in parallel and where the tasks will run, a
few training steps of the student blocks it is given (after warm-up steps that build,
compile and trace), one forward batch of evaluation, and how fast it reads the block's
slice of the activation cache. From those and the task's shape (samples, batch, epochs):

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
import time
from pathlib import Path

import numpy as np

from pbkd_mpi.errors import UserError
from pbkd_mpi.mpi.phases import worker_phase
from pbkd_mpi.schedule.planner import TaskEstimate

PROFILE_VERSION = 1
WARMUP_STEPS = 2  # the first step traces the graph; the second still allocates
TIMED_STEPS = 4
ALLREDUCE_REPEATS = 5
ALLREDUCE_LARGE_BYTES = 4 << 20


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
    from pbkd_mpi import atomic

    path = Path(run_dir) / "profile.json"
    atomic.write_text(path, json.dumps(profile, indent=2) + "\n")
    return path


# --- measuring, on a worker --------------------------------------------------------------

class _StepTimes:
    """Keras callback: the wall time at the end of each training batch."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.ends = [time.perf_counter()]

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

        return Timer()


def _batches_then_halves(batches, steps: int):
    """The batches, then the last `steps` of them again cut in half (each half a step)."""
    def generate():
        yield from batches
        for x, y in batches[-steps:]:
            half = max(1, len(x) // 2)
            yield x[:half], y[:half]
    return generate


def _timed_steps(model, batches, steps: int) -> tuple[float, float, float]:
    """Keras' fit over `batches` (WARMUP_STEPS + steps full batches) and then `steps` half
    batches, fed through tf.data from a Python generator as training feeds it, in one call
    so that nothing is traced twice. Returns (when the first timed step began, median
    seconds of a full-batch step, median seconds of a half-batch step)."""
    import tensorflow as tf

    x0, y0 = batches[0]
    dataset = tf.data.Dataset.from_generator(
        _batches_then_halves(batches, steps),
        output_signature=(tf.TensorSpec((None, *x0.shape[1:]), tf.float32),
                          tf.TensorSpec((None, *y0.shape[1:]), tf.float32)))
    timer = _StepTimes()
    # The step count said, so Keras does not warn that the generator ran out.
    model.fit(dataset, epochs=1, steps_per_epoch=len(batches) + steps, verbose=0,
              callbacks=[timer], shuffle=False)
    times = np.diff(timer.ends)
    full = times[WARMUP_STEPS:WARMUP_STEPS + steps]
    half = times[WARMUP_STEPS + steps:]
    return timer.ends[WARMUP_STEPS], float(np.median(full)), float(np.median(half))


def _sequential_read_rate(store, rows: int) -> float:
    """Bytes per second of one contiguous read of the first `rows` training pairs."""
    x_data, y_data = store.datasets("train")
    rows = min(rows, len(x_data))
    started = time.perf_counter()
    x, y = x_data[:rows], y_data[:rows]
    return (x.nbytes + y.nbytes) / max(time.perf_counter() - started, 1e-12)


def measure_block(task, samples: dict, steps: int = TIMED_STEPS) -> dict:
    """Time a few training steps of `task`'s student block (a BlockTask) on this rank, its
    batches read the way training reads them (cache_reader: from the cache, streamed so
    that only those batches are read, or the teacher prefix recomputed). `samples`:
    {"train": n, "val": n, "item_bytes": of a cached value}. Returns the block's entry."""
    import dataclasses
    import itertools

    import keras

    from pbkd_mpi.cache.reader import open_block_data
    from pbkd_mpi.model.students import build_student_model

    block, batch = task.block, task.config.batch_size
    started = time.perf_counter()
    # Streamed (no memory budget): read what the timed steps need, not the whole split.
    source = (dataclasses.replace(task.source, memory_budget_bytes=0)
              if task.source.mode == "cache" else task.source)
    data = open_block_data(task, source)
    batches = list(itertools.islice(data.train.epoch_batches(0), WARMUP_STEPS + steps))
    read_s = time.perf_counter() - started
    per_sample_bytes = (int(np.prod(block.input_shape))
                        + int(np.prod(block.output_shape))) * samples["item_bytes"]
    read_rate = per_sample_bytes * sum(len(x) for x, _ in batches) / max(read_s, 1e-12)
    store = getattr(data.train, "store", None)
    if store is not None and per_sample_bytes * (samples["train"] + samples["val"]) \
            <= task.source.memory_budget_bytes:
        # The task will load its split whole, one sequential read: time one of those.
        read_rate = _sequential_read_rate(store, len(batches) * batch)

    keras.utils.set_random_seed(task.block_seed)
    build_started = time.perf_counter()
    model = build_student_model(block, task.depth_multiplier)
    for layer_name, arrays in task.initial_weights.items():
        model.get_layer(layer_name).set_weights(arrays)
    model.compile(optimizer=keras.optimizers.Adam(task.config.learning_rate), loss="mse")
    timed_from, step_s, half_s = _timed_steps(model, batches, steps)
    # Build, compile and trace: paid once per task (the warm-up steps less their own work).
    setup_s = max(0.0, timed_from - build_started - WARMUP_STEPS * step_s)
    # Half batches split the step into a fixed and a per-sample part (a worker of a task
    # split k ways has batch / k samples a step).
    half = max(1, batch // 2)
    per_sample = max(0.0, (step_s - half_s) / (batch - half)) if batch > half else 0.0
    fixed = max(0.0, step_s - per_sample * batch)
    # Evaluation is a forward pass: time one batch after one warm call that traces it.
    first_x = batches[0][0]
    model.predict_on_batch(first_x)
    eval_started = time.perf_counter()
    model.predict_on_batch(first_x)
    forward_per_sample = (time.perf_counter() - eval_started) / len(first_x)

    train_n, val_n = samples["train"], samples["val"]
    param_bytes = 4 * int(sum(np.prod(w.shape) for w in model.trainable_weights))
    entry = {
        "seconds_per_step": step_s,
        "fixed_step_s": fixed,
        "per_sample_step_s": per_sample,
        "batch_size": batch,
        "steps_per_epoch": -(-train_n // batch),
        "epochs": task.config.epochs,
        "setup_s": setup_s,
        # A task opens its data and (when it fits in memory) loads it whole first.
        "read_s": per_sample_bytes * (train_n + val_n) / read_rate,
        "bytes_read": per_sample_bytes * (train_n + val_n),
        "read_bytes_per_s": read_rate,
        "eval_s_per_epoch": forward_per_sample * val_n,
        # Before training (val), at the end (train and val), and the BN calibration batch.
        "final_eval_s": forward_per_sample * (train_n + 2 * val_n + 512),
        "param_bytes": param_bytes,
        "profile_s": time.perf_counter() - started,
        "method": "measured",
    }
    entry["estimated_s"] = split_seconds(entry, 1, None)
    return entry


def measure_allreduce(comm, check=None) -> dict:
    """Latency and seconds per byte of an allreduce on `comm` (a small and a 4 MiB float64
    buffer, median of a few each, through the polling collectives)."""
    from pbkd_mpi.mpi.collectives import allreduce_sum, barrier

    def median_time(values):
        times = []
        for _ in range(ALLREDUCE_REPEATS):
            barrier(comm, check)
            started = time.perf_counter()
            allreduce_sum(comm, [values], check)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    small = median_time(np.zeros(1))
    large = median_time(np.zeros(ALLREDUCE_LARGE_BYTES // 8))
    ranks = comm.Get_size()
    rounds = max(1, math.ceil(math.log2(ranks)))
    per_byte = max(0.0, large - small) / (2 * (ranks - 1) / ranks * ALLREDUCE_LARGE_BYTES)
    return {"latency_s": small / (2 * rounds), "seconds_per_byte": per_byte, "ranks": ranks,
            "method": f"measured: allreduce over {ranks} ranks of this run (8 B and "
                      f"{ALLREDUCE_LARGE_BYTES >> 20} MiB, median of {ALLREDUCE_REPEATS}); "
                      f"other rank counts are modelled (binary tree latency, ring bandwidth)"}


@worker_phase("profile")
def profile_phase(context, payload, comm, check) -> dict:
    """A worker's side of the profiling phase: time its share of the blocks, then take
    part in the allreduce measurement with every rank."""
    from pbkd_mpi.output.logs import LOGGER

    entries = {}
    for task in payload["tasks"].get(comm.Get_rank(), []):
        check()
        entries[task.block.name] = measure_block(task, payload["samples"], payload["steps"])
        LOGGER.info("profile %s: %.4f s per step, estimated %.1f s", task.block.name,
                    entries[task.block.name]["seconds_per_step"],
                    entries[task.block.name]["estimated_s"])
    allreduce = measure_allreduce(comm, check) if payload["allreduce"] else None
    return {"blocks": entries, "allreduce": allreduce}


def profile_tasks(coordinator, tasks: dict, samples: dict, job, log) -> dict:
    """Rank 0: the profiling phase. Each worker times its share of `tasks` (BlockTasks,
    dealt longest-first by FLOP estimate so the shares take about as long), all in
    parallel; then every rank times an allreduce (split estimates need it). Returns the
    profile (the FLOP fallback when profiling is off or there is nothing to time)."""
    from pbkd_mpi.schedule.planner import TaskEstimate, make_plan

    if not job.schedule.profile:
        return flop_profile(tasks, "schedule.profile = false")
    if not tasks:
        return flop_profile(tasks, "no block left to train")
    workers = list(coordinator.workers)
    deal = make_plan([TaskEstimate(n, (t.estimated_cost,)) for n, t in tasks.items()],
                     tuple(workers), "static-lpt")
    with_allreduce = len(workers) > 1 and job.schedule.split
    started = time.perf_counter()
    values = coordinator.run_collective(
        "profile",
        {"tasks": {w: [tasks[n] for n in deal.queues[w]] for w in workers},
         "samples": samples, "steps": job.schedule.profile_steps, "allreduce": with_allreduce},
        local=(lambda check: measure_allreduce(coordinator.comm, check)) if with_allreduce
        else None)
    blocks = {}
    for rank in workers:
        for name, entry in values[rank]["blocks"].items():
            blocks[name] = {**entry, "rank": rank, "flop_estimate": tasks[name].estimated_cost}
    profile = {
        "version": PROFILE_VERSION,
        "method": "measured: timed training steps on the worker ranks",
        "workers": len(workers),
        "threads": job.run.threads,
        "wall_s": time.perf_counter() - started,
        "allreduce": values[0],
        "blocks": {name: blocks[name] for name in tasks},
    }
    log(f"profile: {len(blocks)} block(s) timed on {len(workers)} worker(s) in "
        f"{profile['wall_s']:.1f} s; estimated {sum(b['estimated_s'] for b in blocks.values()):.1f} "
        f"s of block training")
    return profile


def flop_profile(tasks, note: str) -> dict:
    """The labelled fallback: each BlockTask's FLOP/IO cost model value as its estimate."""
    return {"version": PROFILE_VERSION, "method": f"FLOP estimate (fallback: {note}); "
            "relative units, only the order of tasks means anything",
            "allreduce": None,
            "blocks": {name: {"estimated_s": task.estimated_cost, "method": "FLOP estimate"}
                       for name, task in tasks.items()}}


def timed_shape_profile(teacher, granularity: str, depth_multiplier: int, batch_size: int,
                        epochs: int, samples: dict, reference: dict,
                        steps: int = TIMED_STEPS) -> dict:
    """A profile of `teacher`'s block tasks without its data or weights: each student
    block's training steps timed on this rank with random activations of the block's
    shapes (step time depends on shapes, not values), at `batch_size` and half of it; the
    cache read rate and the allreduce come from `reference`, a profile measured by a real
    run on this machine. For simulating models too large to distill here."""
    import keras

    from pbkd_mpi.model.selection import select_blocks
    from pbkd_mpi.model.students import build_student_model

    rates = [b["read_bytes_per_s"] for b in reference["blocks"].values()
             if "read_bytes_per_s" in b]
    if not rates or not reference.get("allreduce"):
        raise UserError("the reference profile needs measured read rates and an allreduce "
                        "(a profile.json of a run with 2 or more workers and splitting on)")
    read_rate = float(np.median(rates))
    item_bytes = samples["item_bytes"]
    rng = np.random.default_rng(0)
    blocks = {}
    for block in select_blocks(teacher, granularity, depth_multiplier):
        x = rng.standard_normal(((WARMUP_STEPS + steps) * batch_size, *block.input_shape),
                                np.float32)
        y = rng.standard_normal(((WARMUP_STEPS + steps) * batch_size, *block.output_shape),
                                np.float32)
        keras.utils.set_random_seed(0)
        build_started = time.perf_counter()
        model = build_student_model(block, depth_multiplier)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        batches = [(x[i:i + batch_size], y[i:i + batch_size])
                   for i in range(0, len(x), batch_size)]
        timed_from, step_s, half_s = _timed_steps(model, batches, steps)
        setup_s = max(0.0, timed_from - build_started - WARMUP_STEPS * step_s)
        half = max(1, batch_size // 2)
        per_sample = max(0.0, (step_s - half_s) / (batch_size - half))
        model.predict_on_batch(x[:batch_size])
        eval_started = time.perf_counter()
        model.predict_on_batch(x[:batch_size])
        forward = (time.perf_counter() - eval_started) / batch_size
        per_sample_bytes = (int(np.prod(block.input_shape))
                            + int(np.prod(block.output_shape))) * item_bytes
        train_n, val_n = samples["train"], samples["val"]
        entry = {
            "seconds_per_step": step_s, "fixed_step_s": max(0.0, step_s - per_sample * batch_size),
            "per_sample_step_s": per_sample, "batch_size": batch_size,
            "steps_per_epoch": -(-train_n // batch_size), "epochs": epochs,
            "setup_s": setup_s, "read_s": per_sample_bytes * train_n / read_rate,
            "bytes_read": per_sample_bytes * (train_n + val_n), "read_bytes_per_s": read_rate,
            "eval_s_per_epoch": forward * val_n,
            "final_eval_s": forward * (train_n + 2 * val_n + 512),
            "param_bytes": 4 * int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "method": "timed steps on random activations of the block's shapes",
        }
        entry["estimated_s"] = split_seconds(entry, 1, None)
        blocks[block.name] = entry
    return {
        "version": PROFILE_VERSION,
        "method": (f"timed student-block steps of {teacher.name} on this CPU (1 process, random "
                   f"activations of each block's shapes); cache read rate and allreduce from a "
                   f"measured run's profile; {samples['train']} training samples"),
        "workers": None,
        "allreduce": reference["allreduce"],
        "blocks": blocks,
    }
