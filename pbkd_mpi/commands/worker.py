"""`python -m pbkd_mpi run` on a worker rank: wait for the job, then follow rank 0.

A worker runs the collective phases rank 0 starts (the table below) and pulls block tasks
when rank 0 says SERVE. A failure is reported to rank 0, which ends the job (ABORT); the
worker then leaves with the exit code rank 0 chose.
"""

from __future__ import annotations

import socket
import traceback

from pbkd_mpi import memory_budget
from pbkd_mpi.cache.stage import build_shards_on_worker
from pbkd_mpi.data.dataset import receive_index
from pbkd_mpi.distill.task_runner import task_runner
from pbkd_mpi.errors import EXIT_FAILURE, EXIT_OK
from pbkd_mpi.finetune.stage import finetune_on_worker
from pbkd_mpi.model.choice_timing import time_on_worker
from pbkd_mpi.mpi import faults, phases, supervisor
from pbkd_mpi.mpi.devices import configure_tensorflow_choice, node_cores, worker_threads
from pbkd_mpi.mpi.protocol import AbortRequested, Worker
from pbkd_mpi.output.energy import PhaseMeter
from pbkd_mpi.output.logs import LOGGER, open_rank_log
from pbkd_mpi.schedule.profiling import profile_on_worker


# The collective phases a worker takes part in: handler(context, payload, comm, check),
# where `comm` is the world or the communicator of the ranks rank 0 named for the phase.
# Fine-tuning (added in _follow) also sends rank 0 its epochs for the display.
PHASE_HANDLERS = {phases.TIMING: time_on_worker, phases.CACHE: build_shards_on_worker,
                  phases.PROFILE: profile_on_worker}


def run_worker(comm, layout) -> int:
    local_rank, local_size, root_on_node = layout
    worker = Worker(comm)
    try:
        faults.arm(comm.Get_rank())
        supervisor.note("waiting for the job from rank 0")
        context = worker.receive_job()
        if context is None:
            return EXIT_OK
        supervisor.note("waiting for rank 0", run_dir=context.run_dir)
        threads = worker_threads(context.job.run.threads, node_cores(), local_size,
                                 root_on_node)
        open_rank_log(context.run_dir, comm.Get_rank())
        if context.data_index is not None:
            receive_index(context.data_index)
            LOGGER.info("data: opened rank 0's index (%d training images)",
                        len(context.data_index.y_train))
        device, choice = configure_tensorflow_choice(threads, local_rank)
        LOGGER.info("worker ready: %d intra-op thread(s), device %s (%s)", threads, device,
                    choice.reason)
        meter = PhaseMeter(rank=comm.Get_rank(), node=socket.gethostname(),
                           gpu=choice.device_id, read_rapl=local_rank == 0)
        meter.memory_watch = memory_budget.watch(context.job, local_size, comm.Get_rank())
        _follow(worker, context, meter, (socket.gethostname(), choice.device_id))
        LOGGER.info("worker finished")
    except AbortRequested as request:
        worker.acknowledge_abort()
        return request.exit_code
    except BaseException:  # noqa: BLE001 - tell rank 0, then wait for its word
        worker.report_error("setting up", traceback.format_exc())
        try:
            worker.wait_for_end()
        except AbortRequested as request:
            worker.acknowledge_abort()
            return request.exit_code
        return EXIT_FAILURE
    return EXIT_OK


def _follow(worker, context, meter, device) -> None:
    """Run the phases and tasks rank 0 asks for until it says FINISH."""
    def metered(name, function):
        def run(*args):
            supervisor.note(f"in the {name} phase", run_dir=context.run_dir)
            with meter.phase(name):
                return function(*args)
        return run

    def bound(handler):
        return lambda payload, phase_comm: handler(context, payload, phase_comm,
                                                   worker.abort_check)

    handlers = {name: metered(name, bound(handler)) for name, handler in PHASE_HANDLERS.items()}
    handlers[phases.FINETUNE] = metered(phases.FINETUNE, bound(
        lambda *args: finetune_on_worker(*args, progress=worker.send_progress)))
    handlers[phases.STATS] = lambda _, __: meter.snapshot()
    handlers[phases.DEVICES] = lambda _, __: device
    run_task = task_runner(context.run_dir, meter, worker.abort_check)
    worker.start_heartbeat(context.job.tasks.silence_limit_s / 6)
    try:
        worker.run(handlers, metered("distill", lambda: worker.serve(run_task)))
    finally:
        worker.stop_heartbeat()
        meter.close()
