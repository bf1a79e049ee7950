"""One run on rank 0, stage by stage: `coordinate` is the table of contents.

Each stage is one call into the module that owns it, with the values it needs, returning
a value the later stages take. The worker ranks follow along (commands/worker.py): rank 0
starts the collective phases (cache, profile, fine-tuning) and hands out block tasks.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from pbkd_mpi import memory_budget
from pbkd_mpi.cache.stage import cache_boundaries, prepare_cache
from pbkd_mpi.config import Job
from pbkd_mpi.data.dataset import load_dataset, portable_index
from pbkd_mpi.distill.accept import kept_blocks, stage_judge
from pbkd_mpi.distill.chain import chain_blocks, skipped_pass
from pbkd_mpi.distill.tasks import BlockTasks, place_coordinator
from pbkd_mpi.errors import UserError
from pbkd_mpi.finetune.stage import FinetuneRequest, finetune_stage
from pbkd_mpi.keys import model_fingerprint
from pbkd_mpi.model.assemble import stitch_student
from pbkd_mpi.model.evaluate import test_accuracies, validation_warning
from pbkd_mpi.model.choice import choose_students, nothing_to_train
from pbkd_mpi.model.choice_timing import timing_on_workers
from pbkd_mpi.model.graph import flatten_model
from pbkd_mpi.model.selection import job_blocks, job_warnings
from pbkd_mpi.model.teacher import load_teacher
from pbkd_mpi.mpi import phases, preemption, supervisor
from pbkd_mpi.mpi.phases import WorkerContext
from pbkd_mpi.output.console import progress_callbacks
from pbkd_mpi.output.deploy import deploy_student
from pbkd_mpi.output.logs import open_rank_log
from pbkd_mpi.output.problems import Problems
from pbkd_mpi.output.report import write_report
from pbkd_mpi.output.report_json import build_report
from pbkd_mpi.run_dir import prepare_run_dir


def coordinate(job: Job, coordinator, log, meter=None, fresh: bool = False,
               device: tuple = ("localhost", None), ranks_on_node: int = 1) -> dict:
    """Rank 0: every stage of the run. Returns the report written to the run directory.
    `log(message)` reports progress; `log.detail(message)` finer events (output/console)."""
    started = time.perf_counter()
    run_dir = prepare_run_dir(job, fresh)
    timer = PhaseTimer(meter, on_phase=lambda name: _starting(name, log, run_dir))
    open_rank_log(run_dir, 0)
    with timer("load"):
        dataset = load_dataset(job.data, job.run.seed)
    log(f"data: {dataset.summary()}")
    # Refused in seconds, not after the teacher trains; the block pairs are checked below.
    _check_memory(job, dataset, None, None, ranks_on_node, log)
    with timer("teacher"):
        teacher, teacher_info = load_teacher(
            job.teacher, dataset, run_dir, job.run.seed,
            callbacks=[preemption.keras_callback("training the teacher"),
                       *progress_callbacks(log, "teacher", job.teacher.train_epochs,
                                           run_dir / "tb" / "teacher")])
    log(f"teacher: {teacher_info}")
    teacher_file = str(teacher_info.get("file") or job.teacher.source)
    with timer("blocks"):
        teacher, teacher_fp, blocks = _cut_teacher(teacher, job, log)
        coordinator.silence_limit_s = job.tasks.silence_limit_s
        coordinator.broadcast(WorkerContext(job, str(run_dir), teacher_file,
                                            dataset.fingerprint(), portable_index(dataset)))
        placement = place_coordinator(coordinator, job, device, run_dir, meter, log)
        choice = _students(teacher, blocks, job, teacher_fp, run_dir, coordinator, log)
    blocks = list(choice.blocks)
    memory = _check_memory(job, dataset, teacher, blocks, ranks_on_node, log)
    with timer("cache"):
        cache = prepare_cache(job, teacher, teacher_fp, teacher_file, dataset,
                              cache_boundaries(teacher, blocks), run_dir, coordinator, log)
    log(f"cache: {cache.info}")
    tasks = BlockTasks(job, teacher, choice, cache, len(dataset.y_train), run_dir,
                       coordinator, log, placement)
    with timer("profile"):
        tasks.schedule(BlockTasks.samples(dataset, job.cache.dtype))
    with timer("distill"):  # acceptance too: each student is judged as it arrives
        tasks.run(judge := stage_judge(choice, job, teacher_file, teacher_fp, dataset, log))
    with timer("accept"):
        acceptance = judge.acceptance()
        blocks = kept_blocks(blocks, acceptance)  # a retry may have changed a family
    kept, chained = acceptance.kept, skipped_pass(job, cache.source, log)
    if job.distill.chained_epochs and chained is None:
        with timer("chain"):
            kept, chained = chain_blocks(teacher, blocks, kept, acceptance.multipliers,
                                         tasks.tasks, job, dataset, run_dir, tasks.run_chained, log)
    with timer("assemble"):
        assembled_path = run_dir / "student-assembled.keras"
        student = stitch_student(teacher, blocks, kept, acceptance.multipliers,
                                 dataset.x_train, assembled_path)
    with timer("finetune"):
        tuned = finetune_stage(student, teacher, dataset, job,
                               FinetuneRequest(str(assembled_path), cache.path,
                                               cache.fingerprint, teacher_fp),
                               run_dir, coordinator, log)
    with timer("evaluate"):
        accuracies = test_accuracies(teacher, assembled_path, student, dataset)
    warnings = _data_warnings(accuracies, dataset, teacher_info, log)
    student_path = run_dir / "student.keras"  # written by deploy_student
    problems = Problems(log)  # from here on a failing step is reported, the run goes on
    with timer("deploy"):
        deployment = deploy_student(teacher, student, dataset, teacher_file, student_path,
                                    run_dir, job.export, log, problems)
    worker_stats = [snapshot for rank, snapshot in
                    sorted(coordinator.run_collective(phases.STATS).items()) if rank != 0]
    report = build_report(
        run_dir=run_dir, workers=coordinator.comm.Get_size() - 1, dataset=dataset,
        teacher=teacher, teacher_info=teacher_info, teacher_fingerprint=teacher_fp,
        student=student, student_path=student_path, assembled_path=assembled_path,
        accuracies=accuracies, acceptance=acceptance, max_drop=job.accept.max_drop,
        tasks=tasks, blocks=blocks, phases=timer.seconds, deployment=deployment,
        cache_info=cache.info, tuned=tuned, chained=chained, memory=memory.as_dict(),
        energy_snapshots=[meter.snapshot(), *worker_stats] if meter is not None else None,
        students=choice.record, gate=job.gate, problems=problems.items, warnings=warnings,
        wall_s=time.perf_counter() - started)
    write_report(run_dir, report, problems)
    log.clear_status()
    return report


def _cut_teacher(teacher, job, log):
    """(the teacher flattened, its fingerprint, its blocks). Nested models (a backbone
    used as a layer) are dissolved first, so every block boundary is a layer of the
    teacher whose output the cache can read."""
    teacher = flatten_model(teacher)
    blocks = job_blocks(teacher, job)
    _log_blocks(blocks, job, log)
    return teacher, model_fingerprint(teacher), blocks


def _students(teacher, blocks, job, teacher_fp, run_dir, coordinator, log):
    """model/choice.StudentChoice of `blocks`, the candidates timed on the workers (here
    when there are none: a one-rank world in tests)."""
    choice = choose_students(teacher, blocks, job, teacher_fp, run_dir, log,
                             timing_on_workers(coordinator, teacher_fp)
                             if coordinator.workers else None)
    if (why := nothing_to_train(choice)) is not None:
        raise UserError(why)
    return choice


def _data_warnings(accuracies, dataset, teacher_info, log) -> list[str]:
    """What the user should know of the data (report `warnings`), each logged."""
    warning = validation_warning(accuracies, dataset, teacher_info.get("trained_here", False))
    if warning:
        log(f"warning: {warning}")
    return [warning] if warning else []


def _log_blocks(blocks, job, log) -> None:
    log(f"blocks: {len(blocks)} ({', '.join(f'{b.name} ({b.family})' for b in blocks)})")
    for warning in job_warnings(blocks, job):
        log(f"warning: {warning}")


def _check_memory(job: Job, dataset, teacher, blocks, ranks_on_node: int, log):
    """Refuse the job when one rank's estimate exceeds its budget (memory_budget.py)."""
    memory = memory_budget.estimate(job, dataset, blocks, ranks_on_node, teacher=teacher)
    memory_budget.require_fits(memory, ranks_on_node)
    if blocks is not None:
        log(f"memory per rank: about {memory.need_bytes / 2**20:,.0f} MB of a "
            f"{memory.budget_bytes / 2**20:,.0f} MB budget ({memory.source})")
    return memory


def _starting(name: str, log, run_dir) -> None:
    log.status(f"{name} ...")
    supervisor.note(f"coordinating the {name} stage", run_dir=str(run_dir))


class PhaseTimer:
    """Wall time per phase, and the phase's energy through an output/energy.PhaseMeter."""

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
