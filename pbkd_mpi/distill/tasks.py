"""Rank 0's side of block distillation: the tasks, their reuse, their schedule, their run.

`BlockTasks` holds one `BlockTask` per block. A task whose result an earlier run left in
RUN/blocks/ (keys.task_key names the file) is reused, not trained. The others are
profiled where they will run, planned (schedule/) and handed to the workers; each result
is saved the moment it arrives, so a killed run loses only the tasks still training.
Acceptance (accept.py) calls `retrain_wider` and the chained pass (chain.py) `run_one`,
which follow the same rules: reuse, retries, results saved as they arrive.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import psutil

from pbkd_mpi.distill.results import load_result, progress_path, result_path, save_result
from pbkd_mpi.distill.task_runner import task_runner
from pbkd_mpi.distill.train_block import BlockTask, estimate_cost
from pbkd_mpi.model.students import initial_weights, student_cost
from pbkd_mpi.mpi import phases
from pbkd_mpi.mpi.devices import coordinator_trains
from pbkd_mpi.mpi.protocol import LocalWorker
from pbkd_mpi.output.console import DistillProgress
from pbkd_mpi.schedule.estimates import save_profile, task_estimates
from pbkd_mpi.schedule.planner import forced_ways, make_plan
from pbkd_mpi.schedule.profiling import profile_tasks
from pbkd_mpi.schedule.simulate import simulate_plan


@dataclasses.dataclass
class Retrains:
    """Tasks run after the parallel phase (wider students): their results and records."""

    results: dict = dataclasses.field(default_factory=dict)
    records: list = dataclasses.field(default_factory=list)
    reused: dict = dataclasses.field(default_factory=dict)  # name -> (result, info)

    def weights(self) -> dict:
        return {name: r["weights"] for name, r in self.results.items()} | \
            {name: r["weights"] for name, (r, _) in self.reused.items()}


class BlockTasks:
    """The block tasks of one run, on rank 0 (see the module docstring)."""

    def __init__(self, job, teacher, blocks, cache, train_samples: int, run_dir,
                 coordinator, log):
        self.job, self.teacher, self.run_dir = job, teacher, run_dir
        self.coordinator, self.log = coordinator, log
        self.tasks = {block.name: self._task(block, cache, train_samples) for block in blocks}
        self.reused = {name: loaded for name, task in self.tasks.items()
                       if (loaded := load_result(result_path(run_dir, task))) is not None}
        if self.reused:
            log(f"reusing {len(self.reused)} finished block(s) of an earlier run: "
                f"{', '.join(self.reused)}")
        self.pending = {n: t for n, t in self.tasks.items() if n not in self.reused}
        self.wider = Retrains()
        self.rank0_trains, self.rank0_why = False, ""
        self.profile = self.plan = self.outcome = None
        self.predicted_s = self.coordinator_cpu = 0.0

    def _task(self, block, cache, train_samples: int) -> BlockTask:
        multiplier = self.job.student.depth_multiplier
        cost = estimate_cost(block, student_cost(block, multiplier)[1], train_samples,
                             self.job.distill.epochs)
        return BlockTask(block, str(cache.path), cache.fingerprint, self.job.distill,
                         self.job.run.seed, cost, depth_multiplier=multiplier,
                         initial_weights=initial_weights(block, self.teacher, multiplier),
                         source=cache.source)

    def place(self, device: tuple, meter) -> None:
        """Let rank 0 train tasks too, in a thread, when the job or its GPU says so."""
        chosen = self.coordinator.run_collective(phases.DEVICES, None, lambda check: device)
        self.rank0_trains, self.rank0_why = coordinator_trains(
            self.job.tasks.coordinator_trains, device,
            [chosen[rank] for rank in self.coordinator.workers])
        if self.rank0_trains:
            run_dir = str(self.run_dir)
            self.coordinator.local = LocalWorker(
                lambda stop_check: task_runner(run_dir, meter, stop_check))
            self.log(f"rank 0 trains block tasks too, in a thread: {self.rank0_why}")

    def schedule(self, samples: dict) -> None:
        """Costs measured where the tasks will run (profile.json), then the plan."""
        job = self.job
        self.profile = profile_tasks(self.coordinator, self.pending, samples, job, self.log)
        save_profile(self.run_dir, self.profile)
        workers = self.coordinator.task_workers
        estimates = task_estimates(self.profile, len(workers))
        plan = make_plan(estimates, workers, job.schedule.policy, job.schedule.split)
        if job.schedule.split_blocks:
            plan = make_plan(estimates, workers, job.schedule.policy, True,
                             ways=forced_ways(plan.ways, job.schedule.split_blocks,
                                              estimates, workers))
        self.plan, self.predicted_s = plan, simulate_plan(plan).makespan_s
        split = {name: k for name, k in plan.ways.items() if k > 1}
        # The FLOP fallback's estimates are relative units, not seconds.
        unit = " s" if self.profile["method"].startswith("measured") else " FLOP units"
        self.log(f"schedule: {job.schedule.policy}, predicted makespan {self.predicted_s:.4g}"
                 f"{unit}, lower bound {plan.lower_bound_s:.4g}{unit}"
                 + (f"; split: {', '.join(f'{n} on {k} workers' for n, k in split.items())}"
                    if split else ""))

    def run(self) -> None:
        """The parallel phase: every pending task on the workers, as the plan says."""
        progress = DistillProgress(self.log, dict(self.plan.estimates))

        def keep(name, result, record):
            progress.ended(name)
            seconds = self._store(self.tasks[name], result, record)
            self.log(f"block {name} done on rank {record.rank} in {seconds:.1f} s, "
                     f"val MSE {result['val_mse']:.4g}")

        def give_up(name, errors):
            progress.ended(name)
            self.log(f"block {name} failed {len(errors)} time(s) and stays the teacher's: "
                     f"{errors[-1]['error']} (rank {errors[-1]['rank']})")

        def dispatched(name, rank):
            self.log.detail(f"block {name} -> rank {rank}")
            progress.dispatched(name, rank)

        process = psutil.Process()
        cpu_before, wall_before = process.cpu_times(), time.perf_counter()
        self.outcome = self.coordinator.run_tasks(
            self.pending, dict(self.plan.estimates), plan=self.plan, on_result=keep,
            on_failure=give_up, max_attempts=self.job.tasks.max_attempts,
            on_dispatch=dispatched)
        cpu_after, wall_after = process.cpu_times(), time.perf_counter()
        self.coordinator_cpu = ((cpu_after.user + cpu_after.system)
                                - (cpu_before.user + cpu_before.system)
                                ) / max(wall_after - wall_before, 1e-9)

    def first_weights(self) -> dict:
        """{block name: weights} of every first student trained (this run or reused)."""
        return {name: r["weights"] for name, r in self.outcome.results.items()} | \
            {name: r["weights"] for name, (r, _) in self.reused.items()}

    def retrain_wider(self, names, multiplier: int) -> dict:
        """Acceptance's wider students of `names`: tasks like the first, reused from
        RUN/blocks/ when an earlier run trained them. Returns {name: weights} of those
        that finished."""
        tasks = {name: dataclasses.replace(
            self.tasks[name], depth_multiplier=multiplier,
            initial_weights=initial_weights(self.tasks[name].block, self.teacher, multiplier))
            for name in names}
        for name, task in tasks.items():
            if (loaded := load_result(result_path(self.run_dir, task))) is not None:
                self.wider.reused[name] = loaded
        todo = {name: task for name, task in tasks.items() if name not in self.wider.reused}
        if todo:
            done = self._run_after(todo, "wider block")
            self.wider.results.update(done.results)
            self.wider.records.extend(done.records)
        return self.wider.weights()

    def run_one(self, task) -> tuple[dict | None, list]:
        """One task on one worker (the chained pass): (its result, or None when it failed
        on every attempt; its records). Splitting it over all workers, as a split block of
        the parallel phase, was slower on the demo: docs/usage.md."""
        name = task.block.name
        done = self._run_after({name: task}, "chained block")
        return done.results.get(name), done.records

    def _run_after(self, tasks: dict, what: str):
        return self.coordinator.run_tasks(
            tasks, {name: task.estimated_cost for name, task in tasks.items()},
            max_attempts=self.job.tasks.max_attempts,
            on_result=lambda name, result, record: self._store(tasks[name], result, record),
            on_failure=lambda name, errors: self.log(
                f"{what} {name} failed: {errors[-1]['error']}"))

    def _store(self, task, result, record) -> float:
        seconds = record.end_s - record.start_s
        save_result(result_path(self.run_dir, task), result,
                    {"rank": record.rank, "seconds": seconds})
        progress_path(self.run_dir, task).unlink(missing_ok=True)  # superseded
        return seconds

    def kept(self, wider_names) -> tuple[dict, list, dict]:
        """(results, records, reused) of the student each block kept: the wider retrain's
        for the blocks in `wider_names`, else the first (a block that stayed the teacher's
        shows its first student, the one in the schedule)."""
        def chosen(first: dict, wider: dict) -> dict:
            return {n: v for n, v in first.items() if n not in wider_names} | \
                {n: v for n, v in wider.items() if n in wider_names}

        records = chosen({r.task_id: r for r in self.outcome.records},
                         {r.task_id: r for r in self.wider.records})
        return (chosen(self.outcome.results, self.wider.results), list(records.values()),
                chosen(self.reused, self.wider.reused))

    @staticmethod
    def samples(dataset, cache_dtype: str) -> dict:
        """What profiling needs to know of the data: split sizes and a cached value's bytes."""
        return {"train": len(dataset.y_train), "val": len(dataset.y_val),
                "item_bytes": np.dtype(cache_dtype).itemsize}
