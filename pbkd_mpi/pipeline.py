"""One run, stage by stage: each stage a function call with a value you can print.

Rank 0 runs `coordinate`; worker ranks run `work`. The split keeps MPI out of the stages
themselves (graph, students, cache, training, assembly, report are plain Python/Keras).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

from pbkd_mpi.mpi import preemption, supervisor
from pbkd_mpi.config import Job
from pbkd_mpi.output.console import DistillProgress, epoch_status
from pbkd_mpi.output.logs import epoch_logger, open_rank_log, tensorboard_logger
from pbkd_mpi.run_dir import prepare_run_dir


@dataclass(frozen=True)
class WorkerContext:
    """What rank 0 tells the workers before the first phase: the job and where things are."""

    job: Job
    run_dir: str
    teacher_file: str  # the teacher as a .keras file the workers load (then flatten_model)
    data_fingerprint: str  # the data rank 0 loaded: a worker that loads other data stops


class PhaseTimer:
    """Wall time per phase, and the phase's energy through an energy.PhaseMeter."""

    def __init__(self, meter=None, on_phase=None):
        self.seconds: dict[str, float] = {}
        self.meter = meter
        self.on_phase = on_phase

    @contextmanager
    def __call__(self, name: str):
        if self.on_phase is not None:
            self.on_phase(name)
        started = time.perf_counter()
        try:
            if self.meter is None:
                yield
            else:
                with self.meter.phase(name):
                    yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def coordinate(job: Job, coordinator, log, meter=None, fresh: bool = False,
               device: tuple = ("localhost", None)) -> dict:
    """Rank 0: every stage of the run. Returns the report written to the run directory.
    `log(message)` reports progress; `log.detail(message)` finer events (cli.Console)."""
    from pbkd_mpi.cache.stage import prepare_cache
    from pbkd_mpi.model.assemble import assemble_student
    from pbkd_mpi.model.cost import model_flops
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.distill.accept import ACCEPTED_WIDER, KEPT_TEACHER, accept_blocks
    from pbkd_mpi.output.deploy import export_figures
    from pbkd_mpi.output.exports import tflite_kinds, write_exports
    from pbkd_mpi.finetune.train import accuracy, recalibrate_batchnorm
    from pbkd_mpi.finetune.stage import PHASE as FINETUNE_PHASE
    from pbkd_mpi.finetune.stage import (FinetuneRequest, finetune_key, load_finetuned, run_finetune,
                                 save_finetuned, weights_digest)
    from pbkd_mpi.model.logits import logit_boundary
    from pbkd_mpi.model.graph import boundaries, flatten_model
    from pbkd_mpi.model.selection import granularity_of, select_blocks
    from pbkd_mpi.output.deploy import deployment_figures
    from pbkd_mpi.output.energy import aggregate
    from pbkd_mpi.output.report import block_rows, replaced_totals, schedule_figures, write_report
    from pbkd_mpi.distill.results import load_result, progress_path, result_path, save_result
    from pbkd_mpi.model.students import initial_weights, student_cost
    from pbkd_mpi.model.teacher import (load_model_file, load_teacher, save_model_atomically,
                          weights_fingerprint)
    from pbkd_mpi.distill.train_block import BlockTask, estimate_cost
    from pbkd_mpi.mpi.devices import coordinator_trains
    from pbkd_mpi.schedule.profile import profile_tasks, save_profile, task_estimates
    from pbkd_mpi.mpi.protocol import LocalWorker
    from pbkd_mpi.distill.task_runner import task_runner
    from pbkd_mpi.schedule.planner import forced_ways, make_plan
    from pbkd_mpi.schedule.simulate import simulate_plan
    import numpy as np

    started = time.perf_counter()
    run_dir = prepare_run_dir(job, fresh)

    def starting(name):
        log.status(f"{name} ...")
        supervisor.note(f"coordinating the {name} stage", run_dir=str(run_dir))

    timer = PhaseTimer(meter, on_phase=starting)
    open_rank_log(run_dir, 0)

    with timer("load"):
        dataset = load_dataset(job.data, job.run.seed)
    log(f"data: {dataset.summary()}")
    with timer("teacher"):
        teacher, teacher_info = load_teacher(
            job.teacher, dataset, run_dir, job.run.seed,
            callbacks=[preemption.keras_callback("training the teacher"),
                       epoch_status(log, "teacher", job.teacher.train_epochs),
                       epoch_logger("teacher", log.detail),
                       tensorboard_logger(run_dir / "tb" / "teacher")])
    log(f"teacher: {teacher_info}")

    with timer("blocks"):
        # Nested models (a backbone used as a layer) are dissolved first, so every block
        # boundary is a layer of the teacher whose output the cache can read.
        teacher = flatten_model(teacher)
        multiplier = job.student.depth_multiplier
        blocks = select_blocks(teacher, granularity_of(job.blocks), multiplier,
                               job.student.family, job.student.width_multiplier,
                               job.student.family_overrides)
        student_flops = {block.name: student_cost(block, multiplier)[1] for block in blocks}
    log(f"blocks: {len(blocks)} ({', '.join(b.name for b in blocks)})")
    coordinator.silence_limit_s = job.tasks.silence_limit_s
    coordinator.broadcast(WorkerContext(job, str(run_dir),
                                        str(teacher_info.get("file") or job.teacher.source),
                                        dataset.fingerprint()))

    with timer("cache"):
        # Every rank builds its shards of the cache (cache_phase.py), or recompute mode.
        # The teacher's logit boundary too: distillation reads its soft targets from here.
        names = list(dict.fromkeys([*boundaries(blocks), logit_boundary(teacher)]))
        teacher_fp = weights_fingerprint(teacher)
        stage = prepare_cache(job, teacher, teacher_fp, teacher_info.get("file")
                              or job.teacher.source, dataset, names, run_dir, coordinator, log)
        path, fingerprint, cache_info = stage.path, stage.fingerprint, stage.info
    log(f"cache: {cache_info}")

    tasks = {
        block.name: BlockTask(
            block, str(path), fingerprint, job.distill, job.run.seed,
            estimate_cost(block, student_flops[block.name], len(dataset.y_train),
                          job.distill.epochs),
            depth_multiplier=multiplier,
            initial_weights=initial_weights(block, teacher, multiplier),
            source=stage.source,
        )
        for block in blocks
    }
    paths = {name: result_path(run_dir, task) for name, task in tasks.items()}
    reused = {name: loaded for name, path in paths.items()
              if (loaded := load_result(path)) is not None}
    if reused:
        log(f"reusing {len(reused)} finished block(s) of an earlier run: {', '.join(reused)}")

    pending = {name: task for name, task in tasks.items() if name not in reused}
    chosen = coordinator.run_collective("devices", None, lambda check: device)
    trains, why = coordinator_trains(job.tasks.coordinator_trains, device,
                                     [chosen[rank] for rank in coordinator.workers])
    if trains:
        coordinator.local = LocalWorker(lambda stop_check: task_runner(str(run_dir), meter,
                                                                       stop_check))
        log(f"rank 0 trains block tasks too, in a thread: {why}")
    with timer("profile"):
        # Costs measured where the tasks will run, then the schedule they follow.
        profile = profile_tasks(coordinator, pending, {
            "train": len(dataset.y_train), "val": len(dataset.y_val),
            "item_bytes": np.dtype(job.cache.dtype).itemsize}, job, log)
        save_profile(run_dir, profile)
        workers = coordinator.task_workers
        estimates = task_estimates(profile, len(workers))
        plan = make_plan(estimates, workers, job.schedule.policy, job.schedule.split)
        if job.schedule.split_blocks:
            plan = make_plan(estimates, workers, job.schedule.policy, True,
                             ways=forced_ways(plan.ways, job.schedule.split_blocks,
                                              estimates, workers))
    split = {name: k for name, k in plan.ways.items() if k > 1}
    log(f"schedule: {job.schedule.policy}, predicted makespan "
        f"{simulate_plan(plan).makespan_s:.1f} s, lower bound {plan.lower_bound_s:.1f} s"
        + (f"; split: {', '.join(f'{n} on {k} workers' for n, k in split.items())}"
           if split else ""))
    costs = dict(plan.estimates)
    progress = DistillProgress(log, costs)

    def give_up(name, errors):
        progress.ended(name)
        log(f"block {name} failed {len(errors)} time(s) and stays the teacher's: "
            f"{errors[-1]['error']} (rank {errors[-1]['rank']})")

    def store(task, result, record):
        seconds = record.end_s - record.start_s
        save_result(result_path(run_dir, task), result, {"rank": record.rank, "seconds": seconds})
        progress_path(run_dir, task).unlink(missing_ok=True)  # superseded
        return seconds

    def keep(name, result, record):
        progress.ended(name)
        seconds = store(tasks[name], result, record)
        log(f"block {name} done on rank {record.rank} in {seconds:.1f} s, "
            f"val MSE {result['val_mse']:.4g}")

    with timer("distill"):
        process = psutil.Process()
        cpu_before, wall_before = process.cpu_times(), time.perf_counter()
        outcome = coordinator.run_tasks(
            pending, costs, plan=plan, on_result=keep, on_failure=give_up, max_attempts=job.tasks.max_attempts,
            on_dispatch=lambda name, rank: (log.detail(f"block {name} -> rank {rank}"),
                                            progress.dispatched(name, rank)),
        )
        cpu_after, wall_after = process.cpu_times(), time.perf_counter()
    coordinator_cpu = ((cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
                       ) / max(wall_after - wall_before, 1e-9)

    trained = {name: r for name, r in outcome.results.items()} | \
        {name: r for name, (r, _) in reused.items()}
    wide = {"results": {}, "records": [], "reused": {}}

    def retrain(names, wider):
        # Acceptance's wider students: tasks like the first, reused from RUN/blocks/ when an
        # earlier run trained them.
        wide_tasks = {name: dataclasses.replace(
            tasks[name], depth_multiplier=wider,
            initial_weights=initial_weights(tasks[name].block, teacher, wider)) for name in names}
        wide_paths = {name: result_path(run_dir, task) for name, task in wide_tasks.items()}
        for name, path in wide_paths.items():
            if (loaded := load_result(path)) is not None:
                wide["reused"][name] = loaded
        todo = {name: task for name, task in wide_tasks.items() if name not in wide["reused"]}
        if todo:
            done = coordinator.run_tasks(
                todo, {name: task.estimated_cost for name, task in todo.items()},
                max_attempts=job.tasks.max_attempts,
                on_result=lambda name, result, record: store(todo[name], result, record),
                on_failure=lambda name, errors: log(
                    f"wider block {name} failed: {errors[-1]['error']}"))
            wide["results"].update(done.results)
            wide["records"].extend(done.records)
        return {name: r["weights"] for name, r in wide["results"].items()} | \
            {name: r["weights"] for name, (r, _) in wide["reused"].items()}

    with timer("accept"):
        # Validation only: each block alone in the teacher (accept.py).
        verdicts, kept, multipliers, teacher_val = accept_blocks(
            teacher, blocks, {name: r["weights"] for name, r in trained.items()}, multiplier,
            job.accept, dataset.x_val, dataset.y_val, retrain, log, dataset.x_train)
    for verdict in verdicts.values():
        log.detail(f"block {verdict.name}: alone {verdict.solo_val_accuracy:.4f} val accuracy "
                   f"(teacher {teacher_val:.4f}) -> {verdict.decision}")
    chained = None
    if job.distill.chained_epochs and stage.source.mode == "recompute":
        chained = {"epochs": job.distill.chained_epochs, "blocks": [], "input_bytes_max": 0,
                   "skipped": "cache.mode resolved to recompute: no cache to read targets from"}
        log(f"chained pass skipped: {chained['skipped']}")
    elif job.distill.chained_epochs:
        from pbkd_mpi.distill.chain import chain_blocks

        def run_chained(task):
            # One task at a time, on one worker. Splitting it over all workers (as a split
            # block of the parallel phase) was slower on the demo: docs/usage.md.
            name = task.block.name
            done = coordinator.run_tasks(
                {name: task}, {name: task.estimated_cost}, max_attempts=job.tasks.max_attempts,
                on_result=lambda name, result, record: store(task, result, record),
                on_failure=lambda name, errors: log(
                    f"chained block {name} failed: {errors[-1]['error']}"))
            return done.results.get(name), done.records

        with timer("chain"):
            # Sequential: each block's input is the student with the blocks before it chained.
            kept, chained = chain_blocks(teacher, blocks, kept, multipliers, tasks, job,
                                         dataset, run_dir, run_chained, log)
    with timer("assemble"):
        student = assemble_student(teacher, blocks, kept, multipliers)
        # BN statistics of the stitched student, from training images (no weight trained).
        recalibrate_batchnorm(student, dataset.x_train)
        # The workers load the assembled student from here; the final evaluation scores it.
        assembled_path = run_dir / "student-assembled.keras"
        save_model_atomically(student, assembled_path)
    with timer("finetune"):
        finetuned_key = finetune_key(student, job.finetune, dataset.fingerprint(), teacher_fp,
                                     job.run.seed, coordinator.comm.Get_size())
        tuned = load_finetuned(run_dir, finetuned_key, student)
        if tuned is not None:
            tuned["reused"] = True
            log(f"fine-tuning: reusing the fine-tuned student of an earlier run "
                f"(RUN/finetune/student-{finetuned_key}.keras)")
        else:
            # Data-parallel on every rank (finetune_phase.py), teacher logits from the cache.
            request = FinetuneRequest(str(assembled_path), stage.path, fingerprint, teacher_fp)
            callbacks = [epoch_status(log, "fine-tuning", job.finetune.epochs),
                         epoch_logger("fine-tuning", log.detail),
                         tensorboard_logger(run_dir / "tb" / "finetune")]
            shares = coordinator.run_collective(
                FINETUNE_PHASE, request,
                lambda check: run_finetune(student, teacher, dataset, job, request,
                                           coordinator.comm, check, callbacks))
            tuned = shares[0] | {"reused": False}
            tuned["identical_weights"] = all(
                share["weights_digest"] == weights_digest(student)
                for rank, share in shares.items() if rank != 0)
            save_finetuned(run_dir, finetuned_key, student, tuned)
    log(f"fine-tuning on {tuned['ranks']} ranks: {tuned['epochs']} epochs, val accuracy "
        f"{tuned['val_accuracy_before']:.3f} -> {tuned['val_accuracy']:.3f}"
        + ("" if tuned["identical_weights"] else "; WARNING: ranks ended with different weights"))
    for recovery in tuned["recoveries"]:
        log(f"fine-tuning diverged at epoch {recovery['epoch']} ({recovery['reason']}): best "
            f"weights restored, learning rate x{recovery['learning_rate_scale']:.3g}")

    with timer("evaluate"):
        # The one read of the test split: every choice before this used validation data.
        if dataset.test_reads:
            raise RuntimeError(f"the test split was read {dataset.test_reads} time(s) before "
                               f"the final evaluation; expected 0")
        x_test, y_test = dataset.test_split()
        teacher_accuracy = accuracy(teacher, x_test, y_test)
        merged_accuracy = accuracy(load_model_file(str(assembled_path)), x_test, y_test)
        finetuned_accuracy = accuracy(student, x_test, y_test)
    student_path = run_dir / "student.keras"
    save_model_atomically(student, student_path)
    with timer("deploy"):
        teacher_file = teacher_info.get("file") or job.teacher.source
        deployment = deployment_figures(teacher, student, dataset.image_shape, teacher_file,
                                        student_path)
        exports = write_exports(student, student_path, run_dir, job.export.saved_model,
                                tflite_kinds(job.export.tflite), dataset.x_val)
        deployment["exports"] = export_figures(student, exports, dataset.image_shape,
                                               dataset.x_val)
    for name, figures in deployment["exports"].items():
        log.detail(f"export {name}: {figures['bytes']} bytes, largest output difference "
                   f"{figures['max_abs_diff']:.2g}, class agreement {figures['class_agreement']:.3f}")
    log(f"latency batch 1 (CPU, median): teacher "
        f"{deployment['teacher']['latency_ms']['batch_1']:.2f} ms, student "
        f"{deployment['student']['latency_ms']['batch_1']:.2f} ms")

    worker_stats = [snapshot for rank, snapshot in
                    sorted(coordinator.run_collective("stats").items()) if rank != 0]
    schedule, distill_schedule = schedule_figures(
        plan, outcome.records, len(workers), timer.seconds["distill"], profile,
        simulate_plan(plan).makespan_s)
    # One row per trained block, with the student kept (the wider one when acceptance chose
    # it); a block acceptance gave back to the teacher keeps its row but is not replaced.
    distilled = [block for block in blocks if block.name in verdicts]
    wider_names = {n for n, v in verdicts.items() if v.decision == ACCEPTED_WIDER}

    def chosen(first: dict, wider: dict) -> dict:
        # The wider retrain's entry for a block accepted wider, else the first run's (a
        # block kept the teacher's shows its first student, the one in the schedule).
        return {n: v for n, v in first.items() if n not in wider_names} | \
            {n: v for n, v in wider.items() if n in wider_names}

    records = chosen({r.task_id: r for r in outcome.records},
                     {r.task_id: r for r in wide["records"]})
    rows = block_rows(distilled, chosen(outcome.results, wide["results"]),
                      list(records.values()), chosen(reused, wide["reused"]))
    for row in rows:
        row["accept"] = verdicts[row["name"]].to_dict()
        row["replaced"] = verdicts[row["name"]].decision != KEPT_TEACHER
    replaced = replaced_totals([row for row in rows if row["replaced"]])
    failed = [{"name": name, "attempts": len(errors), "errors": errors}
              for name, errors in outcome.failures.items()]
    report = {
        "status": "degraded" if failed else "ok",
        "run_dir": str(run_dir),
        "workers": coordinator.comm.Get_size() - 1,
        "data": {**dataset.summary(), "test_split_reads": dataset.test_reads},
        "teacher": {
            **teacher_info,
            "params": int(teacher.count_params()),
            "flops": model_flops(teacher),
            "accuracy": teacher_accuracy,
            "fingerprint": teacher_fp,
        },
        "student": {
            "params": int(student.count_params()),
            "flops": model_flops(student),
            "accuracy_merged": merged_accuracy,
            "accuracy_finetuned": finetuned_accuracy,
            "val_accuracy_merged": tuned["val_accuracy_before"],
            "val_accuracy_finetuned": tuned["val_accuracy"],
            "path": str(student_path),
            "assembled_path": str(assembled_path),
        },
        "replaced": replaced,
        "accept": {"max_drop": job.accept.max_drop, "teacher_val_accuracy": teacher_val,
                   "decisions": {d: sum(v.decision == d for v in verdicts.values())
                                 for d in ("accepted", "accepted_wider", "kept_teacher")}},
        "blocks": rows,
        "failed_blocks": failed,
        "phases": timer.seconds,
        "schedule": schedule,
        "distill": {
            "makespan_s": timer.seconds["distill"],
            **distill_schedule,
            "reused_blocks": sum(b["reused"] for b in rows),
            "coordinator_cpu_fraction": coordinator_cpu,
            "coordinator_trains": trains,
            "coordinator_trains_why": why,
            "max_poll_gap_s": coordinator.max_poll_gap_s,
        },
        "deployment": deployment,
        "cache": cache_info,
        "energy": aggregate([meter.snapshot(), *worker_stats]) if meter is not None else None,
        "finetune": tuned,
        "chained": chained,
        "wall_s": time.perf_counter() - started,
    }
    write_report(run_dir, report)
    log.clear_status()
    return report
