"""The Slurm scripts without Slurm: syntax, documented knobs, their command lines under a
fake launcher, the requeue logic of the preemptible script, and a real `mpiexec -n 2`
launch of the `plan` command through each script with Slurm's variables pretended."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
NAMES = [script.name for script in SCRIPTS]


def test_expected_scripts_exist():
    assert {"single-node.sbatch", "multi-node.sbatch", "preemptible.sbatch"} <= set(NAMES)


@pytest.mark.parametrize("script", SCRIPTS, ids=NAMES)
def test_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=NAMES)
def test_every_knob_is_documented_at_the_top(script):
    text = script.read_text()
    header = text.split("\n#SBATCH", 1)[0]
    knobs = set(re.findall(r"^([A-Z_]+)=\$\{\1:-", text, flags=re.M))
    assert {"JOB", "RUN_DIR", "LAUNCHER", "PYTHON", "PBKD_COMMAND"} <= knobs
    for knob in knobs:
        assert re.search(rf"^#\s+{knob}\s", header, flags=re.M), f"{knob} not documented"
    for option in re.findall(r"^#SBATCH (--[a-z-]+)", text, flags=re.M):
        if option not in ("--job-name", "--output", "--time", "--open-mode", "--nodes"):
            assert option in header, f"{option} not documented in {script.name}"


def _slurm_free_env(**extra):
    """The test's environment without any real Slurm variables, plus the pretended ones."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(extra)
    return env


def _executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fakes(tmp_path):
    """A fake launcher that records its arguments and SRUN_CPUS_PER_TASK and exits with
    $FAKE_RC, and a fake scontrol on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = _executable(
        tmp_path / "launcher",
        f'printf "%s\\n" "$@" > "{tmp_path}/launcher.args"\n'
        f'echo "$SRUN_CPUS_PER_TASK" > "{tmp_path}/launcher.cpus"\n'
        # FAKE_TERM: Slurm's SIGTERM at the time limit reaches the batch shell too.
        'if [ -n "$FAKE_TERM" ]; then kill -TERM "$PPID"; sleep 0.5; fi\n'
        'exit "${FAKE_RC:-0}"\n')
    _executable(bin_dir / "scontrol", f'echo "$@" >> "{tmp_path}/scontrol.args"\n')

    def run(script, rc=0, **env):
        full = _slurm_free_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                               LAUNCHER=str(launcher), FAKE_RC=str(rc), **env)
        result = subprocess.run(["bash", str(script)], cwd=REPO, env=full, capture_output=True,
                                text=True, timeout=60)
        args_file = tmp_path / "launcher.args"
        args = args_file.read_text().splitlines() if args_file.exists() else None
        requeue_file = tmp_path / "scontrol.args"
        requeues = requeue_file.read_text().splitlines() if requeue_file.exists() else []
        return result, args, requeues, tmp_path

    return run


@pytest.mark.parametrize("script", SCRIPTS, ids=NAMES)
def test_command_line_from_slurm_variables(fakes, script):
    result, args, requeues, tmp = fakes(script, SLURM_JOB_ID="4242", SLURM_NTASKS="5",
                                        SLURM_CPUS_PER_TASK="3")
    assert result.returncode == 0, result.stderr
    assert args == ["python", "-m", "pbkd_mpi", "run", "jobs/demo.toml",
                    "--set", "run.dir=runs/slurm-4242", "--set", "run.threads=3"]
    assert (tmp / "launcher.cpus").read_text().strip() == "3"  # srun gets --cpus-per-task
    assert requeues == []


@pytest.mark.parametrize("script", SCRIPTS, ids=NAMES)
def test_knobs_override_the_command_line(fakes, script):
    result, args, _, _ = fakes(script, SLURM_JOB_ID="7", JOB="jobs/my.toml",
                               RUN_DIR="/shared/run a", PYTHON="/opt/venv/bin/python",
                               PBKD_COMMAND="plan")
    assert result.returncode == 0, result.stderr
    assert args == ["/opt/venv/bin/python", "-m", "pbkd_mpi", "plan", "jobs/my.toml",
                    "--set", "run.dir=/shared/run a", "--set", "run.threads=0"]


@pytest.mark.parametrize("script", ["single-node.sbatch", "multi-node.sbatch"])
def test_plain_scripts_pass_the_exit_code_on(fakes, script):
    result, _, requeues, _ = fakes(REPO / "slurm" / script, rc=75, SLURM_JOB_ID="9")
    assert result.returncode == 75 and requeues == []


PREEMPTIBLE = REPO / "slurm" / "preemptible.sbatch"


def test_preemptible_requeues_on_exit_75(fakes):
    result, args, requeues, _ = fakes(PREEMPTIBLE, rc=75, SLURM_JOB_ID="4242",
                                      SLURM_RESTART_COUNT="2")
    assert requeues == ["requeue 4242"]
    assert result.returncode == 75
    assert "run.dir=runs/slurm-4242" in args  # the same run directory after the requeue
    assert "preempted, state saved in runs/slurm-4242" in result.stdout


def test_preemptible_requeues_after_slurms_sigterm_reached_the_shell(fakes):
    result, _, requeues, _ = fakes(PREEMPTIBLE, rc=75, SLURM_JOB_ID="4242", FAKE_TERM="1")
    assert requeues == ["requeue 4242"], result.stdout + result.stderr
    assert "SIGTERM received; waiting for the ranks" in result.stdout
    assert result.returncode == 75


def test_preemptible_success_does_not_requeue(fakes):
    result, _, requeues, _ = fakes(PREEMPTIBLE, rc=0, SLURM_JOB_ID="4242")
    assert result.returncode == 0 and requeues == []


def test_preemptible_failure_does_not_requeue(fakes):
    for rc in (1, 2):
        result, _, requeues, _ = fakes(PREEMPTIBLE, rc=rc, SLURM_JOB_ID="4242")
        assert result.returncode == rc and requeues == []


def test_preemptible_stops_requeueing_after_max_restarts(fakes):
    result, _, requeues, _ = fakes(PREEMPTIBLE, rc=75, SLURM_JOB_ID="4242",
                                   SLURM_RESTART_COUNT="3", MAX_RESTARTS="3")
    assert result.returncode == 75 and requeues == []
    assert "not requeueing again" in result.stdout


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec on PATH")
@pytest.mark.parametrize("script", SCRIPTS, ids=NAMES)
def test_script_launches_plan_under_mpiexec(script, tmp_path):
    # The script's command part for real: 2 MPI ranks in place of srun, the tiny job's
    # plan in place of a full run (seconds instead of minutes).
    env = _slurm_free_env(LAUNCHER="mpiexec -n 2", PYTHON=sys.executable, PBKD_COMMAND="plan",
                          JOB="jobs/tiny.toml", RUN_DIR=str(tmp_path / "run"),
                          SLURM_JOB_ID="31337", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1")
    result = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "student/teacher in blocks" in result.stdout
    assert re.search(r"^total\s", result.stdout, flags=re.M)
