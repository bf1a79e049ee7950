"""Steps that may fail without losing the run: what comes after the student exists.

An export, a latency figure or a picture adds to a finished student; none is worth the
run. A failing one is recorded (report.json `problems`: the step and a one-line reason),
its whole error goes to the rank's log, the console gets one line, and the run goes on to
write its report; the job then exits EXIT_PROBLEM (4) unless the job's `gate.allow_problems`
accepts it (docs/usage.md). A stop by signal (Preempted) is no problem: it ends the run.
"""

from __future__ import annotations

import traceback

from pbkd_mpi.mpi import faults
from pbkd_mpi.mpi.preemption import Preempted
from pbkd_mpi.output.logs import LOGGER

REASON_CHARS = 300  # of the first line of the error: the rest is in the rank's log


def one_line(exc: BaseException) -> str:
    """The error's type and first non-empty line, shortened: a converter's error is a
    thousand lines of MLIR."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


class Problems:
    """The failed steps of one run, in the order they failed."""

    def __init__(self, log=None):
        self.items: list[dict] = []
        self.log = log

    def attempt(self, step: str, function, *args, default=None, **kwargs):
        """`function(*args, **kwargs)`, or `default` when it raises (recorded as `step`)."""
        try:
            if faults.failing_step(step):
                raise faults.InjectedFault(f"fault injected into {step!r} (PBKD_FAULT)")
            return function(*args, **kwargs)
        except Preempted:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
            self.record(step, exc)
            return default

    def record(self, step: str, exc: BaseException) -> None:
        reason = one_line(exc)
        LOGGER.error("%s failed:\n%s", step, "".join(traceback.format_exception(exc)).rstrip())
        self.items.append({"step": step, "reason": reason})
        if self.log is not None:
            self.log(f"problem: {step} failed ({reason}); the run goes on, the whole error "
                     f"is in logs/rank-0.log")


def attempt(problems: Problems | None, step: str, function, *args):
    """`function(*args)`; a failure recorded in `problems`, or raised where it is None (a
    caller outside a run, such as a test, sees the error itself)."""
    if problems is None:
        return function(*args)
    return problems.attempt(step, function, *args)
