"""Command line: `run` (the default, the demo job without a file) and `plan`.

Every rank parses the same arguments. Rank 0 loads and validates the job, runs the stages
and is the only rank that writes to the terminal; worker ranks wait for the job and train
the blocks they are given. Any failure ends every rank with one message and one exit code:
2 for bad input, 1 for anything else.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback

from pbkd_mpi.mpi import faults, phases, preemption, supervisor
from pbkd_mpi.errors import EXIT_FAILURE, EXIT_OK, PbkdError, UserError
from pbkd_mpi.output.console import Console
from pbkd_mpi.output.logs import LOGGER, open_rank_log

LAUNCH_HINT = (
    "Launch with at least 2 MPI ranks: rank 0 coordinates and ranks 1..N-1 train blocks, "
    "for example `mpirun -np 3 python -m pbkd_mpi run JOB.toml`."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # every rank parses: raise instead of printing N usages
        raise UserError(f"{message}\n\n{self.format_usage().strip()}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pbkd_mpi", description=(
        "Compress a Keras CNN by parallel blockwise knowledge distillation on MPI. "
        "Without arguments, runs the built-in demo job."))
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = commands.add_parser("run", help="distill a teacher as a job file says (MPI)")
    run.add_argument("job", nargs="?", help="TOML job file (default: the built-in demo job)")
    run.add_argument("--run-dir", help="run directory (overrides run.dir)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a job-file value; repeatable")
    run.add_argument("--fresh", action="store_true",
                     help="clear the run directory's earlier results (teacher, cache, blocks, "
                          "report) and start over, even if they belong to another job")
    loudness = run.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true",
                          help="print only warnings, errors and where the report is")
    loudness.add_argument("--verbose", action="store_true",
                          help="also print each task hand-out and epoch, and TensorFlow's "
                               "own start-up messages")
    plan = commands.add_parser("plan", help="print the block table of a job's teacher")
    plan.add_argument("job", nargs="?", help="TOML job file (default: the built-in demo job)")
    plan.add_argument("--teacher", help="a .keras/.h5 file to inspect instead of the job's teacher")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("--granularity", choices=("layer", "block", "stage"),
                      help="block granularity (overrides blocks.granularity)")
    plan.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    simulate = commands.add_parser(
        "simulate", help="predict each scheduling policy's makespan from a profile.json")
    simulate.add_argument("profile", metavar="PROFILE",
                          help="RUN_DIR/profile.json (or the run directory)")
    simulate.add_argument("--workers", default="1,2,4,8,16,32,64",
                          help="comma-separated worker counts (default: 1,2,4,8,16,32,64)")
    simulate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report = commands.add_parser(
        "report", help="redraw a run's report.md and pictures, or compare two runs")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="one run directory to redraw, or two (A B) to compare")
    report.add_argument("--json", action="store_true", help="comparison as JSON")
    return parser


def entry() -> int:
    """The `pbkd-mpi` command: the same as `python -m pbkd_mpi` (supervised under MPI)."""
    from pbkd_mpi.mpi.supervisor import should_supervise, supervise

    return supervise(sys.argv[1:]) if should_supervise() else main()


def main(argv=None) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    preemption.install()
    argv = list(sys.argv[1:] if argv is None else argv) or ["run"]  # bare: the demo
    from pbkd_mpi.mpi.devices import check_world_size, local_layout

    try:  # the same on every rank: rank 0 alone says so, every rank leaves
        args = build_parser().parse_args(argv)
        if args.command == "run":
            check_world_size(comm.Get_size(), os.environ)
    except UserError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if args.command == "plan":
        return _run_plan(args) if rank == 0 else EXIT_OK
    if args.command == "report":
        return _run_report(args) if rank == 0 else EXIT_OK
    if args.command == "simulate":
        return _run_simulate(args) if rank == 0 else EXIT_OK
    if args.verbose:
        os.environ["PBKD_TF_VERBOSE"] = "1"
    layout = local_layout(comm)
    if rank == 0:
        return _run_coordinator(comm, args, layout)
    return _run_worker(comm, layout)


def _fail(exc: BaseException) -> int:
    LOGGER.error("%s", "".join(traceback.format_exception(exc)).rstrip())
    if isinstance(exc, preemption.Preempted):
        print(f"stopped: {exc}. Every finished block is kept in the run directory; run the "
              f"same command again to resume (exit code {exc.exit_code}).", file=sys.stderr,
              flush=True)
    elif isinstance(exc, PbkdError):  # ours: the message says it all, no traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
    else:
        print("error: rank 0 failed:\n" + traceback.format_exc().rstrip(), file=sys.stderr,
              flush=True)
    return exc.exit_code if isinstance(exc, PbkdError) else EXIT_FAILURE


def _run_coordinator(comm, args, layout) -> int:
    from pbkd_mpi.config import load_job
    from pbkd_mpi.mpi.devices import configure_tensorflow_choice, node_cores
    from pbkd_mpi.output.energy import PhaseMeter
    from pbkd_mpi.mpi.protocol import Coordinator

    local_rank = layout[0]
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
        from pbkd_mpi.pipeline import coordinate

        say = Console(0 if args.quiet else 2 if args.verbose else 1)
        say(f"pbkd_mpi: {comm.Get_size() - 1} worker rank(s), run directory {job.run.dir}")
        try:
            report = coordinate(job, coordinator, say, meter, fresh=args.fresh,
                                device=(socket.gethostname(), choice.device_id))
        finally:
            meter.close()
    except BaseException as exc:  # noqa: BLE001 - every failure must end every rank
        code = _fail(exc)
        if comm.Get_size() > 1 and not coordinator.abort(code):
            print("note: not every worker rank answered; ending the job with MPI_Abort.",
                  file=sys.stderr, flush=True)
            comm.Abort(code)
        return code
    coordinator.finish()
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
    return EXIT_OK


def _run_worker(comm, layout) -> int:
    from pbkd_mpi.mpi.devices import configure_tensorflow_choice, import_tensorflow, node_cores, worker_threads
    from pbkd_mpi.output.energy import PhaseMeter
    from pbkd_mpi.mpi.protocol import AbortRequested, Worker
    from pbkd_mpi.distill.task_runner import task_runner

    local_rank, local_size, root_on_node = layout
    worker = Worker(comm)
    try:
        faults.arm(comm.Get_rank())
        import_tensorflow()  # while rank 0 loads; thread pools are set once the job arrives
        supervisor.note("waiting for the job from rank 0")
        context = worker.receive_job()
        if context is None:
            return EXIT_OK
        supervisor.note("waiting for rank 0", run_dir=context.run_dir)
        threads = worker_threads(context.job.run.threads, node_cores(), local_size,
                                 root_on_node)
        open_rank_log(context.run_dir, comm.Get_rank())
        device, choice = configure_tensorflow_choice(threads, local_rank)
        LOGGER.info("worker ready: %d intra-op thread(s), device %s (%s)", threads, device,
                    choice.reason)
        meter = PhaseMeter(rank=comm.Get_rank(), node=socket.gethostname(),
                           gpu=choice.device_id, read_rapl=local_rank == 0)
        run_task = task_runner(context.run_dir, meter, worker.abort_check)

        def metered(name, function):
            def run(*args):
                supervisor.note(f"in the {name} phase", run_dir=context.run_dir)
                with meter.phase(name):
                    return function(*args)
            return run

        phase_handlers = {name: metered(name, handler) for name, handler in
                          phases.handlers(context, comm, worker.abort_check).items()}
        phase_handlers["stats"] = lambda _: meter.snapshot()  # the last phase of a run
        # Rank 0 asks which GPU each rank chose, to find one no worker uses.
        phase_handlers["devices"] = lambda _: (socket.gethostname(), choice.device_id)
        worker.start_heartbeat(context.job.tasks.silence_limit_s / 6)
        try:
            worker.run(phase_handlers, metered("distill", lambda: worker.serve(run_task)))
        finally:
            worker.stop_heartbeat()
            meter.close()
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


def _run_report(args) -> int:
    import json

    from pbkd_mpi.output.report import compare, load_report, render_comparison, render_report

    try:
        if len(args.runs) == 1:
            path = render_report(args.runs[0], load_report(args.runs[0]))
            print(f"report: {path}")
        elif len(args.runs) == 2:
            comparison = compare(load_report(args.runs[0]), load_report(args.runs[1]))
            print(json.dumps(comparison, indent=2) if args.json
                  else render_comparison(comparison))
        else:
            raise UserError(f"report takes one run directory (redraw) or two (compare), "
                            f"received {len(args.runs)}.")
    except BaseException as exc:  # noqa: BLE001
        return _fail(exc)
    return EXIT_OK


def _run_simulate(args) -> int:
    try:
        from pbkd_mpi.schedule.simulate import simulate_command

        return simulate_command(args)
    except BaseException as exc:  # noqa: BLE001
        return _fail(exc)


def _run_plan(args) -> int:
    try:
        from pbkd_mpi.mpi.devices import import_tensorflow

        import_tensorflow()
        from pbkd_mpi.model.selection import plan_command

        return plan_command(args)
    except BaseException as exc:  # noqa: BLE001
        return _fail(exc)
