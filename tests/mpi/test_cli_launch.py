"""The command line under a launcher and without one: help and version printed once,
and the commands that read files (plan, report, simulate) start no MPI."""

import subprocess
import sys

import pytest

from ..conftest import REPO, TINY_JOB, run_mpi


@pytest.mark.parametrize("flag, expected", [("--help", "usage: "), ("--version", "pbkd_mpi ")])
def test_help_and_version_print_once_under_mpiexec(flag, expected):
    result = run_mpi(2, [flag], timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(expected) == 1, result.stdout
    assert "Traceback" not in result.stderr


def test_a_usage_error_is_said_once_under_mpiexec():
    result = run_mpi(2, ["plan", "--granularity", "cell"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("error: argument --granularity: invalid choice") == 1


def _without_mpi(args) -> subprocess.CompletedProcess:
    """`args` through cli.main in a plain process; prints whether mpi4py.MPI (which
    starts MPI when imported) was loaded."""
    code = ("import sys; from pbkd_mpi.cli import main; code = main(sys.argv[1:]); "
            "print('MPI loaded:', 'mpi4py.MPI' in sys.modules); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_plan_report_and_simulate_start_no_mpi(tmp_path):
    planned = _without_mpi(["plan", TINY_JOB, "--json"])
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert '"blocks"' in planned.stdout and "MPI loaded: False" in planned.stdout
    for command in (["report", tmp_path / "no-run"],
                    ["simulate", tmp_path / "no-run" / "profile.json"]):
        refused = _without_mpi(command)  # a missing run: the user's error, said plainly
        assert refused.returncode == 2 and "no-run" in refused.stderr, refused.stderr
        assert "MPI loaded: False" in refused.stdout


def test_print_job_shows_the_resolved_job_without_running(tmp_path):
    printed = _without_mpi(["run", TINY_JOB, "--print-job", "--set", "distill.epochs=2",
                            "--run-dir", tmp_path / "r"])
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "MPI loaded: False" in printed.stdout and "[distill]\nepochs = 2\n" in printed.stdout
    assert f'dir = "{tmp_path / "r"}"' in printed.stdout
    assert not (tmp_path / "r").exists()  # nothing ran
