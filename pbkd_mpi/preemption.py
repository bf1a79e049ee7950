"""SIGTERM and SIGUSR1: stop at the next safe point, keep what is finished, exit 75.

Slurm sends SIGTERM at the time limit (and SIGUSR1 ahead of it with --signal=USR1@...);
mpiexec forwards both to every rank. Every rank notes the signal instead of dying; the
training loops check the note between batches, and rank 0 turns it into an orderly stop:
no more tasks handed out, running tasks stopped, finished results already on disk, exit
code 75 ("preempted, state saved, requeue me").
"""

from __future__ import annotations

import signal
import threading

from .errors import PbkdError

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested = threading.Event()
_received: list[str] = []


class Preempted(PbkdError):
    exit_code = EXIT_PREEMPTED


def install() -> None:
    def note(signum, _frame):
        _received.append(signal.Signals(signum).name)
        _requested.set()

    for signum in SIGNALS:
        signal.signal(signum, note)


def requested() -> bool:
    return _requested.is_set()


def check(where: str) -> None:
    """Raise Preempted when a signal arrived; `where` says what is being interrupted."""
    if _requested.is_set():
        raise Preempted(f"{_received[0] if _received else 'a signal'} received while {where}")


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
