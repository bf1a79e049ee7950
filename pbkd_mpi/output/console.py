"""Rank 0's voice on the terminal, and every line of it in rank 0's log file.

Not on a terminal (a Slurm output file, a pipe): one plain, timestamped line per event and
no control characters. On a terminal: the same lines, plus a live status line under them
(a progress bar for the phase, in distillation the blocks done, what each worker trains and
an estimate of the time left), redrawn in place.

Under mpiexec rank 0's stdout is a pipe to the launcher even when the launcher writes to a
terminal, so "on a terminal" is decided by the launcher's own stdout (found through /proc
on Linux), or forced with PBKD_PROGRESS=live / plain.
"""

from __future__ import annotations

import os
import sys
import time

from pbkd_mpi.output.logs import LOGGER, epoch_logger, tensorboard_logger

_LAUNCHERS = ("mpiexec", "mpirun", "mpiexec.hydra", "orterun", "prterun", "srun")
_CLEAR_LINE = "\r\x1b[K"


def _launcher_stdout_is_terminal(pid: int | None = None, depth: int = 4) -> bool:
    """True when this process's stdout, or that of the MPI launcher above it, is a
    terminal. Only the launcher's own stdout counts, not that of any ancestor."""
    if sys.stdout.isatty():
        return True
    pid = os.getppid() if pid is None else pid
    for _ in range(depth):
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            if name in _LAUNCHERS:
                target = os.readlink(f"/proc/{pid}/fd/1")
                return target.startswith(("/dev/pts/", "/dev/tty"))
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent's pid
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def live_terminal() -> bool:
    choice = os.environ.get("PBKD_PROGRESS", "auto")
    if choice in ("live", "plain"):
        return choice == "live"
    return _launcher_stdout_is_terminal()


def progress_bar(done: float, total: float, width: int = 20) -> str:
    filled = int(round(width * min(max(done / total, 0.0), 1.0))) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class Console:
    """`console(message)` an event; `.detail()` a finer one (--verbose); `.result()` one
    printed even with --quiet; `.status()` the live line (drawn only on a terminal)."""

    def __init__(self, verbosity: int = 1, live: bool | None = None, stream=None):
        self.verbosity = verbosity  # 0 quiet, 1 normal, 2 verbose
        self.live = live_terminal() if live is None else live
        self.stream = stream or sys.stdout
        self._status = ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _emit(self, message: str, level: int) -> None:
        LOGGER.info(message)
        if self.verbosity < level:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}\n"
        if self.live and self._status:
            self._write(_CLEAR_LINE + line + self._status)  # the line above, status below
        else:
            self._write(line)

    def __call__(self, message: str) -> None:
        self._emit(message, 1)

    def detail(self, message: str) -> None:
        self._emit(message, 2)

    def result(self, message: str) -> None:
        self._emit(message, 0)

    def status(self, text: str) -> None:
        if self.live and self.verbosity > 0:
            self._status = text
            self._write(_CLEAR_LINE + text)

    def clear_status(self) -> None:
        if self.live and self._status:
            self._status = ""
            self._write(_CLEAR_LINE)


def epoch_status(console: Console, what: str, epochs: int):
    """A Keras callback drawing `what [####--] epoch i/N` on the live line."""
    import keras

    class EpochStatus(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            console.status(f"{what} {progress_bar(epoch, epochs)} epoch {epoch + 1}/{epochs}")

    return EpochStatus()


class DistillProgress:
    """The live line of the distillation phase: blocks done, each worker's block, and the
    time left, estimated from the task costs finished so far."""

    def __init__(self, console: Console, cost: dict):
        self.console, self.cost = console, cost
        self.started = time.monotonic()
        self.running: dict[int, str] = {}
        self.finished: set[str] = set()

    def add(self, task_id: str, cost: float) -> None:
        """A task scheduled after the start (acceptance's wider retrain)."""
        self.cost[task_id] = cost
        self._draw()

    def dispatched(self, task_id: str, rank: int) -> None:
        self.running[rank] = task_id
        self._draw()

    def ended(self, task_id: str) -> None:
        self.running = {r: t for r, t in self.running.items() if t != task_id}
        self.finished.add(task_id)
        self._draw()

    def _draw(self) -> None:
        total = sum(self.cost.values())
        done = sum(self.cost[t] for t in self.finished)
        elapsed = time.monotonic() - self.started
        eta = f"~{(total - done) * elapsed / done:.0f} s left" if done else "time left: pending"
        workers = " ".join(f"r{rank}:{task}" for rank, task in sorted(self.running.items()))
        self.console.status(
            f"distill {progress_bar(done, total)} {len(self.finished)}/{len(self.cost)} "
            f"blocks | {workers or 'idle'} | {eta}")


def progress_callbacks(console: Console, what: str, epochs: int, tb_dir) -> list:
    """Rank 0's Keras callbacks for a training it runs: the live line, one log line per
    epoch, TensorBoard scalars under `tb_dir`."""
    return [epoch_status(console, what, epochs), epoch_logger(what, console.detail),
            tensorboard_logger(tb_dir)]


# The callback hooks a training relays to rank 0 (keras.callbacks.Callback's names).
RELAYED_HOOKS = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end")


def relay_callback(send):
    """A Keras callback for a training on a worker: each of RELAYED_HOOKS goes to rank 0 as
    the event (hook, epoch or None, logs) through `send`, for `replay` into rank 0's
    progress_callbacks."""
    import keras

    def event(name, epoch, logs):
        send((name, epoch, {key: float(value) for key, value in (logs or {}).items()}))

    class Relay(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            event("on_train_begin", None, logs)

        def on_epoch_begin(self, epoch, logs=None):
            event("on_epoch_begin", epoch, logs)

        def on_epoch_end(self, epoch, logs=None):
            event("on_epoch_end", epoch, logs)

        def on_train_end(self, logs=None):
            event("on_train_end", None, logs)

    return Relay()


def replay(callbacks, event) -> None:
    """Run a relayed event (relay_callback) on rank 0's `callbacks`."""
    name, epoch, logs = event
    if name not in RELAYED_HOOKS:
        raise ValueError(f"a relayed training event names {name!r}; expected one of "
                         f"{RELAYED_HOOKS}")
    args = () if epoch is None else (epoch,)
    for callback in callbacks:
        getattr(callback, name)(*args, logs=logs)
