"""The candidate students timed on the workers: the collective phase "timing".

Under the latency objective every block's candidates are timed (model/choice.py), one
block independent of the next. Rank 0 deals the blocks to the workers longest first by the
teacher block's FLOPs (as profiling deals its tasks) and each worker times its share on its
own cores at the same time. Measured on the demo (benchmarks/whole_run.py, 2 cores): the
`blocks` phase took 16.5 s with rank 0 timing, 11.5 s with 2 workers timing; with 1 worker
20.2 s, since that worker also loads the teacher and the data there, 3.4 s that its cache
build then does not spend. The candidates of one block are still timed together,
interleaved, in one process (model/block_timing.py), which is what the choice compares.
Each worker's Keras figures use its own intra-op threads (the node's cores divided among
its workers); the record names them (`timed_on`).
"""

from __future__ import annotations

from pbkd_mpi.cache.reader import load_teacher_and_data
from pbkd_mpi.model.block_timing import check_target
from pbkd_mpi.model.choice import time_candidates
from pbkd_mpi.mpi import phases
from pbkd_mpi.mpi.devices import intra_op_threads
from pbkd_mpi.output.logs import LOGGER
from pbkd_mpi.schedule.planner import make_plan
from pbkd_mpi.schedule.scheduler import TaskEstimate


def timing_on_workers(coordinator, teacher_fingerprint: str):
    """A `time_blocks` for model/choice.choose_students that runs the phase."""
    def time_blocks(pairs, student):
        workers = tuple(coordinator.workers)
        # Refused here, in seconds and with exit code 2, not by each worker.
        missing = [str(rank) for rank in workers
                   if coordinator.devices.get(rank, (None, None))[1] is None]
        check_target(student.target, f"worker rank(s) {', '.join(missing)}" if missing else "")
        deal = make_plan([TaskEstimate(block.name, (float(block.teacher_flops),))
                          for block, _ in pairs], workers, "static-lpt")
        by_name = {block.name: (block, found) for block, found in pairs}
        values = coordinator.run_collective(phases.TIMING, {
            "teacher_fingerprint": teacher_fingerprint, "student": student,
            "blocks": {rank: [by_name[name] for name in deal.queues[rank]]
                       for rank in workers}})
        timed = [values[rank] for rank in workers if values[rank]["timings"]]
        threads = sorted({value["threads"] for value in timed})
        where = (f"{len(timed)} worker rank(s) at once, "
                 f"{'/'.join(str(t) for t in threads)} thread(s) each")
        return {name: ms for value in timed for name, ms in value["timings"].items()}, where
    return time_blocks


def time_on_worker(context, payload, comm, check) -> dict:
    """A worker's side: time the candidates of its share of the blocks."""
    share = payload["blocks"].get(comm.Get_rank(), [])
    timings = {}
    if share:
        teacher, _ = load_teacher_and_data(
            context.teacher_file, payload["teacher_fingerprint"], context.job.data,
            context.data_fingerprint, context.job.run.seed)
        for block, found in share:
            check()
            timings[block.name] = time_candidates(teacher, block, found, payload["student"])
            LOGGER.info("timing %s: %d candidates, %s", block.name, len(found),
                        {measure: [round(ms, 4) for ms in times]
                         for measure, times in timings[block.name].items()})
    return {"timings": timings,
            "threads": intra_op_threads()}
