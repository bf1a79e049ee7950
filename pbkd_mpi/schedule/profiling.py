"""Profiling: each worker times its share of the block tasks where they will run.

Before distillation every worker rank times, in parallel, a few training steps of the
student blocks it is given (after warm-up steps that build, compile and trace), one forward
batch of evaluation, and how fast it reads the block's slice of the activation cache; then
every rank times an allreduce. The result is profile.json (estimates.py turns it into the
schedule's estimates). Keras and TensorFlow are imported where they are used: the
simulate command reads profiles without paying their start-up.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np

from pbkd_mpi.cache.layout import pair_bytes
from pbkd_mpi.cache.reader import open_block_data
from pbkd_mpi.model.students import build_student_model
from pbkd_mpi.mpi import phases
from pbkd_mpi.mpi.collectives import allreduce_sum, barrier
from pbkd_mpi.output.logs import LOGGER
from pbkd_mpi.schedule.estimates import PROFILE_VERSION, split_seconds
from pbkd_mpi.schedule.planner import make_plan
from pbkd_mpi.schedule.scheduler import TaskEstimate

WARMUP_STEPS = 2  # the first step traces the graph; the second still allocates
TIMED_STEPS = 4
ALLREDUCE_REPEATS = 5
ALLREDUCE_LARGE_BYTES = 4 << 20


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
    batches read the way training reads them (cache/reader.py: from the cache, streamed so
    that only those batches are read, or the teacher prefix recomputed). `samples`:
    {"train": n, "val": n, "item_bytes": of a cached value}. Returns the block's entry."""
    import keras

    block, batch = task.block, task.config.batch_size
    started = time.perf_counter()
    # Streamed (no memory budget): read what the timed steps need, not the whole split.
    source = (dataclasses.replace(task.source, memory_budget_bytes=0)
              if task.source.mode == "cache" else task.source)
    with open_block_data(task, source) as data:
        needed = WARMUP_STEPS + steps
        batches = list(itertools.islice(data.train.epoch_batches(0), needed))
        # A training split of fewer batches than the steps timed (a small data set, large
        # batches): its batches again, as the next epochs would give them.
        batches = [batches[i % len(batches)] for i in range(needed)]
        read_s = time.perf_counter() - started
        per_sample_bytes = pair_bytes(block, samples["item_bytes"])
        read_rate = per_sample_bytes * sum(len(x) for x, _ in batches) / max(read_s, 1e-12)
        store = getattr(data.train, "store", None)
        if store is not None and store.bytes <= task.source.memory_budget_bytes:
            # The task will load its split whole, one sequential read: time one of those.
            read_rate = _sequential_read_rate(store, len(batches) * batch)

    keras.utils.set_random_seed(task.block_seed)
    build_started = time.perf_counter()
    model = build_student_model(block, task.depth_multiplier)
    for layer_name, arrays in task.initial_weights.items():
        model.get_layer(layer_name).set_weights(arrays)
    model.compile(optimizer=keras.optimizers.Adam(task.config.learning_rate), loss="mse")
    timed = time_student(model, batches, steps, build_started)
    batches.clear()  # tf.data never frees the generator that holds them
    return block_entry(timed, batch, task.config.epochs, samples, per_sample_bytes, read_rate,
                       method="measured", profile_s=time.perf_counter() - started)


def time_student(model, batches, steps: int, build_started: float) -> dict:
    """A compiled student's step and forward times over `batches` (WARMUP_STEPS + steps
    full batches); `build_started`: when building it began, so setup is counted too."""
    batch = len(batches[0][0])
    timed_from, step_s, half_s = _timed_steps(model, batches, steps)
    # Half batches split the step into a fixed and a per-sample part (a worker of a task
    # split k ways has batch / k samples a step).
    half = max(1, batch // 2)
    per_sample = max(0.0, (step_s - half_s) / (batch - half)) if batch > half else 0.0
    # Evaluation is a forward pass: time one batch after one warm call that traces it.
    model.predict_on_batch(batches[0][0])
    eval_started = time.perf_counter()
    model.predict_on_batch(batches[0][0])
    return {
        "seconds_per_step": step_s,
        "fixed_step_s": max(0.0, step_s - per_sample * batch),
        "per_sample_step_s": per_sample,
        # Build, compile and trace: paid once per task (the warm-up steps less their work).
        "setup_s": max(0.0, timed_from - build_started - WARMUP_STEPS * step_s),
        "forward_s_per_sample": (time.perf_counter() - eval_started) / batch,
        "param_bytes": 4 * int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    }


def block_entry(timed: dict, batch: int, epochs: int, samples: dict, per_sample_bytes: int,
                read_rate: float, method: str, **extra) -> dict:
    """A block's profile.json entry from `time_student`'s figures and the task's shape."""
    train_n, val_n = samples["train"], samples["val"]
    forward = timed["forward_s_per_sample"]
    entry = {
        **{key: timed[key] for key in ("seconds_per_step", "fixed_step_s",
                                       "per_sample_step_s")},
        "batch_size": batch,
        "steps_per_epoch": -(-train_n // batch),
        "epochs": epochs,
        "setup_s": timed["setup_s"],
        # A task opens its data and (when it fits in memory) loads it whole first.
        "read_s": per_sample_bytes * (train_n + val_n) / read_rate,
        "bytes_read": per_sample_bytes * (train_n + val_n),
        "read_bytes_per_s": read_rate,
        "eval_s_per_epoch": forward * val_n,
        # Before training (val), at the end (train and val), and the BN calibration batch.
        "final_eval_s": forward * (train_n + 2 * val_n + 512),
        "param_bytes": timed["param_bytes"],
        **extra,
        "method": method,
    }
    entry["estimated_s"] = split_seconds(entry, 1, None)
    return entry


def measure_allreduce(comm, check=None) -> dict:
    """Latency and seconds per byte of an allreduce on `comm` (a small and a 4 MiB float64
    buffer, median of a few each, through the polling collectives)."""
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


def profile_on_worker(context, payload, comm, check) -> dict:
    """A worker's side of the profiling phase: time its share of the blocks, then take
    part in the allreduce measurement with every rank."""
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
        phases.PROFILE,
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
