"""SIGTERM and SIGUSR1: stop at the next safe point, keep what is finished, exit 75.

Slurm sends SIGTERM at the time limit (and SIGUSR1 ahead of it with --signal=USR1@...);
mpiexec forwards both to every rank. Every rank notes the signal instead of dying; the
training loops check the note between batches, and rank 0 turns it into an orderly stop:
no more tasks handed out, running tasks stopped, finished results already on disk, exit
code 75 ("preempted, state saved, requeue me").

A stop must never hang: Slurm's SIGKILL follows SIGTERM after KillWait (30 s by default),
and a rank stuck in a call that never returns would otherwise keep its allocation until
then, or forever under a plain mpiexec. So a watchdog thread waits on the signal too: it
is woken by the interpreter's C-level handler (`signal.set_wakeup_fd`), which runs even
while the main thread is blocked in C and cannot run Python handlers, sets the note itself,
and if the rank is still alive `STOP_GRACE_S` later it prints every thread's stack (what
was stuck, for the bug report) and ends the rank with exit code 75. Everything finished is
already on disk by then: results and checkpoints are written atomically.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

from pbkd_mpi.errors import PbkdError, UserError
from pbkd_mpi.mpi.supervisor import launcher_rank

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# An orderly stop takes seconds (rank 0 gives workers 10 s to answer); the watchdog must
# act before Slurm's SIGKILL, KillWait (30 s by default) after SIGTERM, so that the stack
# dump and exit 75 are seen. A cluster with a shorter KillWait sets PBKD_STOP_GRACE_S.
STOP_GRACE_S = 25.0
GRACE_VARIABLE = "PBKD_STOP_GRACE_S"
FINALIZE_GRACE_S = 30.0  # every rank reaches MPI_Finalize within seconds of the others

# The signals received, in order. The note is this list alone, with no lock: a Python
# handler runs between two bytecodes of the main thread, possibly inside another handler
# (mpiexec may deliver the signal twice), and a threading.Event there deadlocked on its own
# lock (CI, the SIGUSR1 test: rank 0 stuck in Event.set inside Event.set).
_received: list[str] = []


class Preempted(PbkdError):
    exit_code = EXIT_PREEMPTED


def _note(signum, _frame=None) -> None:
    _received.append(signal.Signals(signum).name)


def stop_grace_s(environ=os.environ) -> float:
    """The watchdog's grace: PBKD_STOP_GRACE_S, else STOP_GRACE_S."""
    text = environ.get(GRACE_VARIABLE, "")
    try:
        grace = float(text) if text else STOP_GRACE_S
    except ValueError:
        grace = -1.0
    if not grace > 0:
        raise UserError(f"{GRACE_VARIABLE} expects seconds greater than 0 (below Slurm's "
                        f"KillWait), received {text!r}.")
    return grace


def install(grace_s: float | None = None) -> None:
    """Note SIGTERM and SIGUSR1 instead of dying, and end this process `grace_s` (default
    `stop_grace_s()`) after the first of them if it has not ended by itself. Call once,
    from the main thread."""
    grace_s = stop_grace_s() if grace_s is None else grace_s
    for signum in SIGNALS:
        signal.signal(signum, _note)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(read_fd, grace_s), name="pbkd-stop-watchdog",
                     daemon=True).start()


def _watchdog(read_fd: int, grace_s: float) -> None:
    wanted = {int(s) for s in SIGNALS}
    while True:  # the wakeup fd carries every signal with a Python handler (SIGINT too)
        received = [n for n in os.read(read_fd, 64) if n in wanted]
        if received:
            break
    if not _received:  # the main thread has not run its handler yet
        _note(received[0])
    time.sleep(grace_s)
    rank = launcher_rank()
    who = f"rank {rank}" if rank is not None else f"process {os.getpid()}"
    sys.stderr.write(
        f"error: {who} did not stop within {grace_s:g} s of "
        f"{_received[0]}; ending it with exit code {EXIT_PREEMPTED}. Every finished block "
        f"is saved in the run directory; run the same command again to resume. Where its "
        f"threads were stuck (please report this):\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(EXIT_PREEMPTED)


def finalize_within(grace_s: float = FINALIZE_GRACE_S) -> None:
    """MPI_Finalize, ending this process (exit code 1, every thread's stack on stderr) if it
    has not returned `grace_s` later.

    MPICH's MPI_Finalize waits for every other rank to finalize too, and mpi4py calls it
    holding the GIL (measured: a Python thread stops ticking for as long as a peer is
    late), so while one rank is stuck, every rank that already left sits in it with no
    Python thread able to run: the stop watchdog above cannot fire. Left to the
    interpreter's exit it is worse: mpi4py finalizes from Py_AtExit, after faulthandler
    is shut down. So the ranks finalize here, explicitly, under faulthandler's watchdog,
    a C thread that needs no GIL. When it fires, the launcher sees this rank fail and
    ends the stuck one: the job ends instead of hanging."""
    from mpi4py import MPI

    if MPI.Is_finalized() or not MPI.Is_initialized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    faulthandler.dump_traceback_later(grace_s, exit=True)
    try:
        MPI.Finalize()
    finally:
        faulthandler.cancel_dump_traceback_later()


def requested() -> bool:
    return bool(_received)


def check(where: str) -> None:
    """Raise Preempted when a signal arrived; `where` says what is being interrupted."""
    if _received:
        raise Preempted(f"{_received[0]} received while {where}")


def keras_callback(where: str, also=None):
    """A callback that stops training at the next batch when a signal arrived; `also`, if
    given, is called every batch too (e.g. a check for rank 0's abort message)."""
    import keras

    class PreemptionCheck(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            check(where)
            if also is not None:
                also()

    return PreemptionCheck()
