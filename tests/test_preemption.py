"""A stop signal ends a rank: in order when it can, by the watchdog when it is stuck."""

import signal
import subprocess
import sys
import time

import pytest

from pbkd_mpi.mpi import preemption

from .conftest import REPO

STUCK_AFTER_THE_SIGNAL = """
import threading
from pbkd_mpi.mpi import preemption
preemption.install(grace_s=1.0)

def stuck_forever():
    lock = threading.Lock()
    lock.acquire()
    print("ready", flush=True)
    lock.acquire()  # never released: a call that does not come back

stuck_forever()
"""

STOPS_IN_ORDER = """
import time
from pbkd_mpi.mpi import preemption
preemption.install(grace_s=1.0)
print("ready", flush=True)
while not preemption.requested():
    time.sleep(0.01)
try:
    preemption.check("waiting in a test")
except preemption.Preempted as stop:
    print(f"stopped: {stop}", flush=True)
raise SystemExit(3)
"""


def _signal_when_ready(code: str, signum=signal.SIGUSR1, timeout=30):
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert job.stdout.readline() == "ready\n"
    job.send_signal(signum)
    signalled = time.monotonic()
    out, err = job.communicate(timeout=timeout)
    return job.returncode, out, err, time.monotonic() - signalled


def test_a_rank_stuck_after_the_signal_is_ended_with_75_and_says_where_it_was_stuck():
    code, _, err, elapsed = _signal_when_ready(STUCK_AFTER_THE_SIGNAL)
    assert code == 75, err
    assert elapsed < 10
    assert "did not stop within 1 s of SIGUSR1" in err
    assert "run the same command again to resume" in err
    assert "stuck_forever" in err  # every thread's stack, the main thread's included


def test_an_orderly_stop_keeps_its_own_exit_code():
    code, out, err, elapsed = _signal_when_ready(STOPS_IN_ORDER, signal.SIGTERM)
    assert "stopped: SIGTERM received while waiting in a test" in out
    assert code == 3 and elapsed < 1.0 and "did not stop" not in err


def test_the_stop_grace_is_below_slurms_killwait_unless_set():
    from pbkd_mpi.errors import UserError

    assert preemption.stop_grace_s({}) == 25.0 < 30.0  # Slurm's default KillWait
    assert preemption.stop_grace_s({"PBKD_STOP_GRACE_S": "8"}) == 8.0
    for bad in ("0", "soon", "-3"):
        with pytest.raises(UserError, match="PBKD_STOP_GRACE_S expects seconds"):
            preemption.stop_grace_s({"PBKD_STOP_GRACE_S": bad})
