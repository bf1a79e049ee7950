"""The per-rank supervisor: it names a rank killed by a signal, and passes exit codes on."""

import signal
import sys

from pbkd_mpi.mpi.supervisor import death_message, launcher_rank, should_supervise, supervise


CHILD_NOTES_THEN_DIES = """
import os, signal
from pbkd_mpi.mpi.supervisor import note
note("training block conv3", run_dir="/runs/x")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_only_ranks_under_a_launcher_are_supervised_and_only_once():
    assert not should_supervise({})
    assert should_supervise({"PMI_RANK": "2"})
    assert should_supervise({"SLURM_PROCID": "0"})
    assert not should_supervise({"PMI_RANK": "2", "PBKD_SUPERVISED": "1"})  # the child
    assert not should_supervise({"PMI_RANK": "2", "PBKD_SUPERVISE": "0"})
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "5"}) == 5


def test_a_killed_child_is_named_with_its_rank_signal_and_task(monkeypatch, capsys):
    monkeypatch.setenv("PMI_RANK", "3")
    code = supervise(["-c", CHILD_NOTES_THEN_DIES], program=(sys.executable,))
    assert code == 128 + signal.SIGKILL
    err = capsys.readouterr().err
    assert "error: rank 3 was killed by SIGKILL while training block conv3." in err
    assert "out-of-memory killer" in err
    assert "/runs/x/blocks; run the same command again to resume" in err


def test_an_exit_code_passes_through_without_a_message(monkeypatch, capsys):
    monkeypatch.setenv("PMI_RANK", "1")
    assert supervise(["-c", "raise SystemExit(75)"], program=(sys.executable,)) == 75
    assert capsys.readouterr().err == ""


def test_the_coordinator_is_named_as_such():
    message = death_message(0, signal.SIGSEGV, {"doing": "coordinating the cache stage"})
    assert message.startswith("error: rank 0 (the coordinator) was killed by SIGSEGV while "
                              "coordinating the cache stage.")
    assert "out-of-memory" not in message


CHILD_STOPS_ON_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
time.sleep(60)
"""


def test_termination_signals_reach_the_child(monkeypatch):
    import os
    import threading
    import time

    monkeypatch.setenv("PMI_RANK", "1")
    started = time.monotonic()
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert supervise(["-c", CHILD_STOPS_ON_SIGTERM], program=(sys.executable,)) == 75
    assert time.monotonic() - started < 30
