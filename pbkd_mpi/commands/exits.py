"""How a command ends on a failure: one message on stderr, the traceback in the rank's log,
and the exit code the exception carries (errors.py)."""

from __future__ import annotations

import sys
import traceback

from pbkd_mpi.errors import EXIT_FAILURE, PbkdError
from pbkd_mpi.mpi.preemption import Preempted
from pbkd_mpi.output.logs import LOGGER


def report_failure(exc: BaseException) -> int:
    """Say what failed, once, and return the exit code for it."""
    LOGGER.error("%s", "".join(traceback.format_exception(exc)).rstrip())
    if isinstance(exc, Preempted):
        print(f"stopped: {exc}. Every finished block is kept in the run directory; run the "
              f"same command again to resume (exit code {exc.exit_code}).", file=sys.stderr,
              flush=True)
    elif isinstance(exc, PbkdError):  # ours: the message says it all, no traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
    else:
        print("error: rank 0 failed:\n" + "".join(traceback.format_exception(exc)).rstrip(),
              file=sys.stderr, flush=True)
    return exc.exit_code if isinstance(exc, PbkdError) else EXIT_FAILURE


def failures_reported(command):
    """`command(args)` with any failure reported as `report_failure` does."""
    def run(args) -> int:
        try:
            return command(args)
        except BaseException as exc:  # noqa: BLE001 - one message and an exit code
            return report_failure(exc)
    return run
