"""Fault injection for tests, through the PBKD_FAULT environment variable.

Forms, several separated by commas:
  raise:BLOCK           the task of block BLOCK raises an exception on its worker
  nan:BLOCK             the task of block BLOCK trains on data with a NaN, so its loss is NaN
  signal:NAME:SECONDS   rank 0 receives SIGNAME (USR1 or TERM) SECONDS after it starts
  kill:RANK:SECONDS     rank RANK kills itself (SIGKILL) SECONDS after it starts its first
                        block task
  hang:RANK:SECONDS     rank RANK stops itself (SIGSTOP) SECONDS after it starts its first
                        block task: alive, but silent
  killwrite:RANK:N      rank RANK kills itself (SIGKILL) half-way through writing its N-th
                        activation cache shard
  fail:STEP             a step after the student exists (output/problems.py) whose name
                        contains STEP raises, e.g. fail:tflite_int8, fail:latency
Not for production use: it exists so that the failure paths are tested for real.
"""

from __future__ import annotations

import os
import signal
import threading

from pbkd_mpi.errors import UserError

KINDS = ("raise", "nan", "signal", "kill", "hang", "killwrite", "fail")
_TIMED = {"signal", "kill", "hang"}  # KIND:WHO:SECONDS
SIGNAL_NAMES = ("USR1", "TERM")


class InjectedFault(RuntimeError):
    pass


def parse(text: str) -> list[tuple[str, str]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, target = item.partition(":")
        if kind in _TIMED:
            who, _, seconds = target.partition(":")
            valid = seconds.replace(".", "", 1).isdigit() and (
                who in SIGNAL_NAMES if kind == "signal" else who.isdigit())
        else:
            valid = kind in KINDS and bool(target)
        if not valid:
            raise UserError(
                f"PBKD_FAULT expects items like raise:BLOCK, nan:BLOCK, signal:USR1:SECONDS, "
                f"kill:RANK:SECONDS, hang:RANK:SECONDS, killwrite:RANK:N or fail:STEP, "
                f"received {item!r}."
            )
        faults.append((kind, target))
    return faults


def active(kind: str, target: str) -> bool:
    return (kind, target) in parse(os.environ.get("PBKD_FAULT", ""))


def failing_step(step: str) -> bool:
    """Whether a fail:STEP item names part of `step`."""
    return any(kind == "fail" and target in step
               for kind, target in parse(os.environ.get("PBKD_FAULT", "")))


# Kill and hang timers wait for the rank's first block task: counted from start-up, they
# would land in whichever stage (loading, caching) happens to take that long on the machine.
_task_timers: list[threading.Timer] = []


def arm(rank: int) -> None:
    """Arm this rank's timed faults: signal items start now on rank 0; kill and hang items
    on the rank they name start with its first block task (`task_started`). Every rank
    calls this once at start-up."""
    for kind, target in parse(os.environ.get("PBKD_FAULT", "")):
        if kind not in _TIMED:
            continue
        who, _, seconds = target.partition(":")
        if kind == "signal" and rank == 0:
            signum = getattr(signal, f"SIG{who}")
        elif kind in ("kill", "hang") and int(who) == rank:
            signum = signal.SIGKILL if kind == "kill" else signal.SIGSTOP
        else:
            continue
        timer = threading.Timer(float(seconds), os.kill, (os.getpid(), signum))
        timer.daemon = True
        if kind == "signal":
            timer.start()
        else:
            _task_timers.append(timer)


def task_started() -> None:
    """Start the kill and hang timers armed for this rank (once: later calls do nothing)."""
    while _task_timers:
        _task_timers.pop().start()
