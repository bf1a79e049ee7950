"""A small parent process per rank, so a rank killed by a signal is named, with its task.

When a rank dies of SIGKILL (the out-of-memory killer, a node's health check, a user's
`kill -9`), the MPI launcher ends every other rank at once: MPICH's Hydra kills them in the
same second, so no surviving rank gets to say which rank died or what it was doing. The
launcher starts this module instead; it runs the real rank as its child process (the way a
wrapper shell script would: the child inherits the launcher's PMI connection and the same
stdout/stderr), forwards termination signals to it, and when the child dies of a signal
it prints one line naming the rank, the signal and what the rank was doing (the child keeps
that in a small status file), then exits with 128 + the signal number so the launcher ends
the job as before. It imports nothing but the standard library: it costs a few megabytes.

`PBKD_SUPERVISE=0` turns it off (the rank then runs in the launcher's process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

# Set by the launchers we know; without one (a plain `python -m pbkd_mpi plan`) nothing
# would end the other ranks anyway, so the rank runs unsupervised.
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK",
                  "SLURM_PROCID")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
STATUS_VARIABLE = "PBKD_STATUS_FILE"
SUPERVISED_VARIABLE = "PBKD_SUPERVISED"


def launcher_rank(environ=os.environ) -> int | None:
    for name in RANK_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def should_supervise(environ=os.environ) -> bool:
    return (environ.get(SUPERVISED_VARIABLE) != "1" and environ.get("PBKD_SUPERVISE") != "0"
            and launcher_rank(environ) is not None)


def note(doing: str, **details) -> None:
    """Record what this rank is doing, for its supervisor's message if it is killed.
    Cheap (one small atomic file write); a no-op when the rank is not supervised."""
    path = os.environ.get(STATUS_VARIABLE)
    if not path:
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump({"doing": doing, **details}, file)
    os.replace(temporary, path)


def _read_status(path: str) -> dict:
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def death_message(rank: int | None, signum: int, status: dict) -> str:
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ \
        else f"signal {signum}"
    who = f"rank {rank}" if rank is not None else "a rank"
    if rank == 0:
        who += " (the coordinator)"
    doing = status.get("doing", "starting up")
    message = f"error: {who} was killed by {name} while {doing}."
    if signum == signal.SIGKILL:
        message += (" A SIGKILL nobody sent on purpose is usually the out-of-memory killer: "
                    "see `dmesg` on that node or the job's memory limit.")
    run_dir = status.get("run_dir")
    if run_dir:
        message += (f" Every finished block is saved in {os.path.join(run_dir, 'blocks')}; "
                    f"run the same command again to resume.")
    return message


def supervise(argv: list[str], program=(sys.executable, "-m", "pbkd_mpi")) -> int:
    """Run `python -m pbkd_mpi ARGV` as a child rank and return its exit code, saying
    which rank died and while doing what when a signal killed it."""
    rank = launcher_rank()
    handle, status_path = tempfile.mkstemp(prefix=f"pbkd-rank-{rank}-", suffix=".json")
    os.close(handle)
    env = {**os.environ, SUPERVISED_VARIABLE: "1", STATUS_VARIABLE: status_path}
    # close_fds=False: the launcher's PMI socket (PMI_FD) must reach the child.
    child = subprocess.Popen([*program, *argv], env=env, close_fds=False)

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        code = child.wait()  # waitpid: sleeps in the kernel, no polling
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        status = _read_status(status_path)
        for path in (status_path, f"{status_path}.tmp"):
            try:
                os.unlink(path)
            except OSError:
                pass
    if code >= 0:
        return code
    print(death_message(rank, -code, status), file=sys.stderr, flush=True)
    return 128 - code
