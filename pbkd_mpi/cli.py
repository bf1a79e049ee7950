"""Command line: parse the arguments, pick the command, end with its exit code.

Commands (pbkd_mpi/commands/): `run` (the default; the demo job without a file) on every
rank, and `plan`, `simulate`, `report`, `check`, `baselines` on rank 0. Every rank parses
the same arguments before MPI starts; `run` starts MPI, the others only under a launcher (to check
the launch), so they and --help, --version work on a login node without a process
manager. Rank 0 alone writes to the terminal. Any failure ends every rank with one
message and one exit code: 2 for bad input, 3 for a student that missed the job's
[gate], 75 for a stop signal, 1 for anything else.

The command modules are imported here, inside `main`, and only the one that runs: the
modules that use Keras import it when they load, and TensorFlow must first be imported
by `import_tensorflow` (its log settings and CUDA's device order are fixed before that
import), while `report`, `simulate` and `--help` never need it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from pbkd_mpi.errors import EXIT_OK, UserError
from pbkd_mpi.mpi import preemption
from pbkd_mpi.mpi.devices import check_world_size, import_tensorflow, local_layout
from pbkd_mpi.mpi.supervisor import launcher_rank, should_supervise, supervise


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # every rank parses: raise instead of printing N usages
        raise UserError(f"{message}\n\n{self.format_usage().strip()}")

    def _print_message(self, message, file=None):
        # --help and --version: every rank parses, the launcher's rank 0 alone prints.
        if launcher_rank() in (None, 0):
            super()._print_message(message, file)


def package_version() -> str:
    try:
        return importlib.metadata.version("pbkd_mpi")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_program_name(), description=(
        "Compress a Keras CNN by parallel blockwise knowledge distillation on MPI. "
        "Without arguments, runs the built-in demo job."))
    parser.add_argument("--version", action="version",
                        version=f"pbkd_mpi {package_version()}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = commands.add_parser("run", help="distill a teacher as a job file says (MPI)")
    run.add_argument("job", nargs="?", help="TOML job file (default: the built-in demo job)")
    run.add_argument("--run-dir", help="run directory (overrides run.dir)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a job-file value; repeatable")
    run.add_argument("--print-job", action="store_true",
                     help="print the resolved job (every key, paths absolute) and exit "
                          "without running; needs no mpirun")
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
    simulate.add_argument("--whole-run", action="store_true",
                          help="project every phase after the teacher, not only distillation")
    simulate.add_argument("--phases", metavar="REPORT", default=None,
                          help="--whole-run: the report.json whose phases to project "
                               "(default: the one beside PROFILE)")
    report = commands.add_parser(
        "report", help="redraw a run's report.md and pictures, or compare two runs")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="one run directory to redraw, or two (A B) to compare")
    report.add_argument("--json", action="store_true", help="comparison as JSON")
    check = commands.add_parser(
        "check", help="apply a quality gate to a finished run (exit 3 when a bar is missed)")
    check.add_argument("run", metavar="RUN_DIR", help="a finished run's directory")
    check.add_argument("--set", action="append", default=[], metavar="gate.KEY=VALUE",
                       help="a gate bar, overriding the run's job; repeatable")
    check.add_argument("--json", action="store_true", help="print JSON instead of lines")
    baselines = commands.add_parser(
        "baselines", help="train whole-model KD and from-scratch students for a finished "
                          "run's wall time, for comparison (one process)")
    baselines.add_argument("run", metavar="RUN_DIR", help="a finished run's directory")
    baselines.add_argument("--budget-factor", default="1", metavar="F[,F...]",
                           help="budgets as multiples of the run's wall time after the "
                                "teacher (default: 1)")
    baselines.add_argument("--budget-s", type=float, metavar="SECONDS",
                           help="the wall time to multiply instead of the run's (needed when "
                                "the run reused an earlier run's work)")
    baselines.add_argument("--learning-rate", type=float, default=1e-3,
                           help="Adam's starting rate, decayed by a cosine (default: 1e-3)")
    return parser


def entry() -> int:
    """The `pbkd-mpi` command: the same as `python -m pbkd_mpi` (supervised under MPI)."""
    return supervise(sys.argv[1:]) if should_supervise() else main()


def _program_name() -> str:
    """How the user started us, for usage lines: the installed command or the module."""
    return "pbkd-mpi" if os.path.basename(sys.argv[0]) == "pbkd-mpi" else "python -m pbkd_mpi"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["run"]  # bare: the demo
    # Parsed before MPI starts: `plan`, `report`, `simulate`, `check`, --help and --version
    # need no process manager (a login node has none); only `run`, and the others when a
    # launcher started them (to check the launch), start MPI.
    launched_as = launcher_rank()  # None without a launcher
    rank = launched_as or 0
    try:  # the same on every rank: rank 0 alone says so, every rank leaves
        args = build_parser().parse_args(argv)
    except UserError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if args.command == "run" and not args.print_job:
        comm, code = _joined_world(run=True)
        if code != EXIT_OK:
            return code
        code = _run(comm, args)
        preemption.finalize_within()
        return code
    if launched_as is not None:  # under mpirun/srun: check the launch all the same
        _, code = _joined_world(run=False)
        if code != EXIT_OK:
            return code
    if rank != 0:
        return EXIT_OK
    from pbkd_mpi.commands.exits import failures_reported

    if args.command == "run":  # --print-job
        from pbkd_mpi.commands.job import print_job as command
    elif args.command == "plan":
        import_tensorflow()
        from pbkd_mpi.commands.plan import plan_command as command
    elif args.command == "report":
        from pbkd_mpi.commands.report import report_command as command
    elif args.command == "check":
        from pbkd_mpi.commands.check import check_command as command
    elif args.command == "baselines":
        import_tensorflow()
        from pbkd_mpi.commands.baselines import baselines_command as command
    else:
        from pbkd_mpi.commands.simulate import simulate_command as command
    return failures_reported(command)(args)


def _joined_world(run: bool):
    """Start MPI and check that the ranks joined one MPI job (`run` notes stop signals
    first; `plan` under a launcher, as PBKD_COMMAND=plan in the sbatch scripts, checks the
    launch too). Returns (the world communicator, EXIT_OK or the code rank 0 explained)."""
    from mpi4py import MPI  # starts MPI: after the supervisor decided not to run instead

    comm = MPI.COMM_WORLD
    try:
        if run:
            preemption.install()
        check_world_size(comm.Get_size(), os.environ)
    except UserError as exc:
        if comm.Get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return comm, exc.exit_code
    return comm, EXIT_OK


def _run(comm, args) -> int:
    if args.verbose:
        os.environ["PBKD_TF_VERBOSE"] = "1"
    layout = local_layout(comm)
    import_tensorflow()  # workers: while rank 0 loads; thread pools are set later
    if comm.Get_rank() == 0:
        from pbkd_mpi.commands.run import run_coordinator

        return run_coordinator(comm, args, *layout[:2])
    from pbkd_mpi.commands.worker import run_worker

    return run_worker(comm, layout)
