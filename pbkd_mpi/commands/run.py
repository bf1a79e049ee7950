"""`python -m pbkd_mpi run` on rank 0: load the job, run the pipeline, end every rank.

Any failure, on this rank or reported by a worker, ends every rank with one message and
one exit code; the workers are told to leave (ABORT), and MPI_Abort ends the job when one
of them does not answer.
"""

from __future__ import annotations

import os
import socket
import sys

from pbkd_mpi import memory_budget
from pbkd_mpi.commands.exits import report_failure
from pbkd_mpi.config import load_job
from pbkd_mpi.errors import EXIT_GATE, EXIT_PROBLEM, UserError
from pbkd_mpi.gate import exit_code, failed_bars
from pbkd_mpi.mpi import faults
from pbkd_mpi.mpi.devices import configure_tensorflow_choice, node_cores
from pbkd_mpi.mpi.protocol import Coordinator
from pbkd_mpi.output.console import Console
from pbkd_mpi.output.energy import PhaseMeter
from pbkd_mpi.pipeline import coordinate

LAUNCH_HINT = (
    "Launch with at least 2 MPI ranks: rank 0 coordinates and ranks 1..N-1 train blocks, "
    "for example `mpirun -np 3 python -m pbkd_mpi run JOB.toml`."
)


def run_coordinator(comm, args, local_rank: int, ranks_on_node: int) -> int:
    coordinator = Coordinator(comm)
    try:
        if comm.Get_size() < 2:
            raise UserError(
                f"Only 1 MPI rank is running, so no rank can train blocks. {LAUNCH_HINT}")
        job = load_job(args.job, args.set, run_dir=args.run_dir)
        faults.arm(0)  # parses PBKD_FAULT: a typo fails here, on rank 0, not on a worker
        # Rank 0 trains the teacher while the workers sleep: all cores, unless the job
        # fixes the threads per rank (then every rank trains with the same reductions).
        _, choice = configure_tensorflow_choice(job.run.threads or node_cores(), local_rank)
        meter = PhaseMeter(rank=0, node=socket.gethostname(), gpu=choice.device_id,
                           read_rapl=local_rank == 0)
        meter.memory_watch = memory_budget.watch(job, ranks_on_node, 0)
        say = Console(0 if args.quiet else 2 if args.verbose else 1)
        say(f"pbkd_mpi: {comm.Get_size() - 1} worker rank(s), run directory {job.run.dir}")
        try:
            report = coordinate(job, coordinator, say, meter, fresh=args.fresh,
                                device=(socket.gethostname(), choice.device_id),
                                ranks_on_node=ranks_on_node)
        finally:
            meter.close()
    except BaseException as exc:  # noqa: BLE001 - every failure must end every rank
        code = report_failure(exc)
        if comm.Get_size() > 1 and not coordinator.abort(code):
            print("note: not every worker rank answered; ending the job with MPI_Abort.",
                  file=sys.stderr, flush=True)
            comm.Abort(code)
        return code
    coordinator.finish()
    _summarise(report, say)
    code = exit_code(job.gate, report)
    if code == EXIT_GATE:
        say.result(f"quality gate failed: {failed_bars(report['gate'])} (report.md, "
                   f"`gate` in report.json); exit {EXIT_GATE}")
    elif code == EXIT_PROBLEM:
        say.result(f"finished with {len(report['problems'])} problem(s) after the student "
                   f"was made: {'; '.join(p['step'] for p in report['problems'])} (report.md, "
                   f"`problems` in report.json, logs/rank-0.log); exit {EXIT_PROBLEM} "
                   f"(gate.allow_problems = true accepts them)")
    return code


def _summarise(report: dict, say) -> None:
    teacher, student = report["teacher"], report["student"]
    say(
        f"done in {report['wall_s']:.1f} s: teacher {teacher['params']} params, test accuracy "
        f"{teacher['accuracy']:.3f}; student {student['params']} params, test accuracy "
        f"{student['accuracy_finetuned']:.3f} (merged {student['accuracy_merged']:.3f})"
    )
    say.result(f"report: {os.path.join(report['run_dir'], 'report.md')} (and report.json), "
               f"student: {student['path']}")
    for failure in report["failed_blocks"]:
        say.result(f"warning: block {failure['name']} stays the teacher's after "
                   f"{failure['attempts']} failed attempt(s): {failure['errors'][-1]['error']}")
