"""Rank 0's side of block distillation: the tasks, their reuse, their schedule, their run.

`BlockTasks` holds one `BlockTask` per block. A task whose result an earlier run left in
RUN/blocks/ (keys.task_key names the file) is reused, not trained. The others are
profiled where they will run, planned (schedule/) and handed to the workers; each result
is saved the moment it arrives, so a killed run loses only the tasks still training.
Acceptance (accept.Judge) runs alongside the parallel phase (`run(judge)`): its scores
(score.py) and retrains (the next candidate student, or a wider one) join the same
schedule. The chained pass (chain.py) calls `run_chained`. Every task follows the same
rules: reuse, retries, results saved as they arrive.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import psutil

from pbkd_mpi.distill.results import load_result, progress_path, result_path, save_result
from pbkd_mpi.distill.task_runner import task_runner
from pbkd_mpi.distill.train_block import BlockTask, estimate_cost
from pbkd_mpi.model.students import initial_weights
from pbkd_mpi.mpi import phases
from pbkd_mpi.mpi.devices import coordinator_trains
from pbkd_mpi.mpi.protocol import LocalWorker
from pbkd_mpi.output.console import DistillProgress
from pbkd_mpi.schedule.estimates import save_profile, task_estimates
from pbkd_mpi.schedule.planner import forced_ways, make_plan
from pbkd_mpi.schedule.profiling import profile_tasks
from pbkd_mpi.schedule.simulate import simulate_plan


WIDER = "+wider"  # task id of a block's retrain (accept.py): the block's name and this
SCORE = "+score"  # task id of a solo swap's score (distill/score.py): its student's and this


def _block_of(task_id: str) -> str:
    return task_id.removesuffix(SCORE).removesuffix(WIDER)


@dataclasses.dataclass
class Retrains:
    """Acceptance's wider students: their results and records, by block name."""

    results: dict = dataclasses.field(default_factory=dict)
    records: list = dataclasses.field(default_factory=list)
    reused: dict = dataclasses.field(default_factory=dict)  # name -> (result, info)


def place_coordinator(coordinator, job, device: tuple, run_dir, meter, log) -> tuple[bool, str]:
    """Whether rank 0 computes beside coordinating, and why (devices.coordinator_trains):
    then it trains block tasks in a thread and takes part in the cache build and
    fine-tuning, which otherwise run on the workers alone (`coordinator.compute_ranks`)."""
    chosen = coordinator.run_collective(phases.DEVICES, None, lambda check: device)
    coordinator.devices = chosen
    trains, why = coordinator_trains(job.tasks.coordinator_trains, device,
                                     [chosen[rank] for rank in coordinator.workers])
    if trains:
        run_dir = str(run_dir)
        coordinator.local = LocalWorker(lambda stop_check: task_runner(run_dir, meter, stop_check))
        log(f"rank 0 computes too (block tasks in a thread, cache, fine-tuning): {why}")
    return trains, why


class BlockTasks:
    """The block tasks of one run, on rank 0 (see the module docstring)."""

    def __init__(self, job, teacher, choice, cache, train_samples: int, run_dir,
                 coordinator, log, placement: tuple[bool, str] = (False, "")):
        self.job, self.teacher, self.run_dir = job, teacher, run_dir
        self.coordinator, self.log = coordinator, log
        self.tasks = {block.name: self._task(choice.candidate(block), cache, train_samples)
                      for block in choice.blocks}
        self.reused = {name: loaded for name, task in self.tasks.items()
                       if (loaded := load_result(result_path(run_dir, task))) is not None}
        if self.reused:
            log(f"reusing {len(self.reused)} finished block(s) of an earlier run: "
                f"{', '.join(self.reused)}")
        self.pending = {n: t for n, t in self.tasks.items() if n not in self.reused}
        self.wider = Retrains()
        self._wider_tasks: dict = {}  # task id (name + WIDER) -> its BlockTask
        self.rank0_trains, self.rank0_why = placement  # place_coordinator's
        self.profile = self.plan = self.outcome = None
        self.predicted_s = self.coordinator_cpu = 0.0

    def _task(self, student, cache, train_samples: int) -> BlockTask:
        """The task of `student` (model/choice.Candidate)."""
        block, multiplier = student.block, student.depth_multiplier
        cost = estimate_cost(block, student.cost[1], train_samples, self.job.distill.epochs)
        return BlockTask(block, str(cache.path), cache.fingerprint, self.job.distill,
                         self.job.run.seed, cost, depth_multiplier=multiplier,
                         initial_weights=initial_weights(block, self.teacher, multiplier),
                         source=cache.source)

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

    def run(self, judge=None) -> None:
        """The parallel phase: every pending task on the workers, as the plan says. With a
        `judge` (accept.Judge), acceptance runs alongside: each student is scored as it
        arrives, and a failing block's wider retrain joins the schedule at once."""
        progress = DistillProgress(self.log, dict(self.plan.estimates))
        follow_up = _Acceptance(self, judge, progress) if judge is not None else None

        def keep(task_id, result, record):
            progress.ended(task_id)
            if task_id.endswith(SCORE):
                judge.scored(follow_up.scores.pop(task_id), result["val_accuracy"],
                             result["seconds"])
                return
            seconds = self._store(self._task_of(task_id), result, record)
            self.log(f"block {task_id} done on rank {record.rank} in {seconds:.1f} s, "
                     f"val MSE {result['val_mse']:.4g}")
            if judge is not None:
                judge.arrived(_block_of(task_id), result["weights"], task_id.endswith(WIDER))

        def give_up(task_id, errors):
            progress.ended(task_id)
            if task_id.endswith(SCORE):  # as any error of rank 0's: the run cannot judge
                raise RuntimeError(f"scoring {task_id.removesuffix(SCORE)} failed on every "
                                   f"attempt: {errors[-1]['error']} (rank "
                                   f"{errors[-1]['rank']})\n{errors[-1]['traceback']}")
            self.log(f"block {task_id} failed {len(errors)} time(s) and stays the teacher's: "
                     f"{errors[-1]['error']} (rank {errors[-1]['rank']})")
            if judge is not None and task_id.endswith(WIDER):
                judge.wider_failed(_block_of(task_id))

        def dispatched(task_id, rank):
            self.log.detail(f"block {task_id} -> rank {rank}")
            progress.dispatched(task_id, rank)

        if judge is not None:
            for name, (result, _) in self.reused.items():
                judge.arrived(name, result["weights"])
        process = psutil.Process()
        cpu_before, wall_before = process.cpu_times(), time.perf_counter()
        outcome = self.coordinator.run_tasks(
            self.pending, dict(self.plan.estimates), plan=self.plan, on_result=keep,
            on_failure=give_up, max_attempts=self.job.tasks.max_attempts,
            on_dispatch=dispatched, follow_up=follow_up)
        cpu_after, wall_after = process.cpu_times(), time.perf_counter()
        self.coordinator_cpu = ((cpu_after.user + cpu_after.system)
                                - (cpu_before.user + cpu_before.system)
                                ) / max(wall_after - wall_before, 1e-9)
        self.outcome, wider = _separate(outcome)
        self.wider.results.update(wider.results)
        self.wider.records.extend(wider.records)

    def retry_task(self, name: str, student) -> BlockTask:
        """Acceptance's retry of block `name` (a model/choice.Candidate): a task like its
        first, for that student."""
        block, multiplier = student.block, student.depth_multiplier
        return dataclasses.replace(
            self.tasks[name], block=block, depth_multiplier=multiplier,
            initial_weights=initial_weights(block, self.teacher, multiplier))

    def add_wider(self, task_id: str, task: BlockTask) -> None:
        self._wider_tasks[task_id] = task

    def _task_of(self, task_id: str) -> BlockTask:
        return self._wider_tasks[task_id] if task_id.endswith(WIDER) else self.tasks[task_id]

    def run_chained(self, tasks: dict) -> dict:
        """The chained pass's tasks on the workers, at once, longest first: {name: result}
        of those that finished. (Splitting one over all workers, as a split block of the
        parallel phase, was slower on the demo: docs/usage.md.)"""
        return self.coordinator.run_tasks(
            tasks, {name: task.estimated_cost for name, task in tasks.items()},
            max_attempts=self.job.tasks.max_attempts,
            on_result=lambda name, result, record: self._store(tasks[name], result, record),
            on_failure=lambda name, errors: self.log(
                f"chained block {name} failed: {errors[-1]['error']}")).results

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


class _Acceptance:
    """The follow-up of the parallel phase (mpi/protocol.Coordinator.run_tasks): what the
    judge asks for, as tasks - each score ahead of the queued blocks (a verdict can free a
    wider retrain), each wider retrain by its first student's estimate - or, where an
    earlier run trained a wider student, its saved result straight back to the judge."""

    def __init__(self, tasks: BlockTasks, judge, progress):
        self.tasks, self.judge, self.progress = tasks, judge, progress
        self.scores: dict = {}  # task id -> ScoreTask handed out

    def busy(self) -> bool:
        return self.judge.busy()

    def step(self) -> dict:
        added = {}
        estimates = self.tasks.plan.estimates
        shortest = min(estimates.values(), default=1.0)
        scores, retrains = self.judge.take_requests()
        for task in scores:
            task_id = task.name + (WIDER if task.wider else "") + SCORE
            self.scores[task_id] = task
            self.progress.add(task_id, 0.0)
            added[task_id] = (task, shortest, True)
        for name in retrains:
            task = self.tasks.retry_task(name, self.judge.student(name, retry=True))
            if (loaded := load_result(result_path(self.tasks.run_dir, task))) is not None:
                self.tasks.wider.reused[name] = loaded
                self.judge.arrived(name, loaded[0]["weights"], wider=True)
                continue
            # Its first student's estimate: the wider one trains on the same pairs.
            estimate = estimates.get(name) or max(estimates.values(), default=1.0)
            self.tasks.add_wider(name + WIDER, task)
            self.progress.add(name + WIDER, estimate)
            added[name + WIDER] = (task, estimate, False)
        return added


def _separate(outcome):
    """(the first students' outcome, the wider retrains' as a Retrains with block names);
    the scores are the judge's."""
    def first_pass(task_id: str) -> bool:
        return not task_id.endswith((WIDER, SCORE))

    first = dataclasses.replace(
        outcome, results={k: v for k, v in outcome.results.items() if first_pass(k)},
        records=[r for r in outcome.records if first_pass(r.task_id)],
        failures={k: v for k, v in outcome.failures.items() if first_pass(k)})
    wider = Retrains(
        results={_block_of(k): v for k, v in outcome.results.items() if k.endswith(WIDER)},
        records=[dataclasses.replace(r, task_id=_block_of(r.task_id))
                 for r in outcome.records if r.task_id.endswith(WIDER)])
    return first, wider
