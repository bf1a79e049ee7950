"""Fault injection for tests, through the PBKD_FAULT environment variable.

Forms, several separated by commas:
  raise:BLOCK           the task of block BLOCK raises an exception on its worker
  nan:BLOCK             the task of block BLOCK trains on data with a NaN, so its loss is NaN
  signal:NAME:SECONDS   rank 0 receives SIGNAME (USR1 or TERM) SECONDS after it starts
Not for production use: it exists so that the failure paths are tested for real.
"""

from __future__ import annotations

import os
import signal
import threading

from .errors import UserError

KINDS = ("raise", "nan", "signal")
SIGNAL_NAMES = ("USR1", "TERM")


class InjectedFault(RuntimeError):
    pass


def parse(text: str) -> list[tuple[str, str]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, target = item.partition(":")
        if kind == "signal":
            name, _, seconds = target.partition(":")
            valid = name in SIGNAL_NAMES and seconds.replace(".", "", 1).isdigit()
        else:
            valid = kind in KINDS and bool(target)
        if not valid:
            raise UserError(
                f"PBKD_FAULT expects items like raise:BLOCK, nan:BLOCK or "
                f"signal:USR1:SECONDS, received {item!r}."
            )
        faults.append((kind, target))
    return faults


def active(kind: str, target: str) -> bool:
    return (kind, target) in parse(os.environ.get("PBKD_FAULT", ""))


def arm_signals() -> None:
    """Start the timers of the signal:NAME:SECONDS items (rank 0 calls this once)."""
    for kind, target in parse(os.environ.get("PBKD_FAULT", "")):
        if kind == "signal":
            name, _, seconds = target.partition(":")
            signum = getattr(signal, f"SIG{name}")
            timer = threading.Timer(float(seconds), os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()
