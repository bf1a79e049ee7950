"""Peak resident memory per phase.

A process's high-water mark (getrusage's ru_maxrss, /proc's VmHWM) only ever grows, so
read at the end of a phase it is the peak of everything before too: a fine-tuning phase
would carry the distillation phase's peak. On Linux, writing "5" to /proc/self/clear_refs
resets the mark to the current RSS; `PeakMemory` does that when a measurement starts, and
folds the mark into every measurement still open first, so nested ones (a task inside a
phase) stay right. Elsewhere the process's mark is what there is (an upper bound).
"""

from __future__ import annotations

import itertools
import sys
import threading

import psutil

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _high_water_bytes() -> int:
    """The process's peak RSS since the last reset (VmHWM), or since it started."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _reset_high_water() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak RSS of overlapping measurements: `start()` gives a token, `stop(token)` the
    peak in bytes since."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}
        self._tokens = itertools.count()
        self.process_peak = _high_water_bytes()

    def _fold(self) -> None:
        mark = _high_water_bytes()
        self.process_peak = max(self.process_peak, mark)
        for token in self._open:
            self._open[token] = max(self._open[token], mark)

    def start(self) -> int:
        with self._lock:
            self._fold()
            _reset_high_water()
            token = next(self._tokens)
            self._open[token] = psutil.Process().memory_info().rss
            return token

    def stop(self, token: int) -> int:
        with self._lock:
            self._fold()
            return self._open.pop(token)

    def peak(self) -> int:
        """The process's peak RSS since it started."""
        with self._lock:
            self._fold()
            return self.process_peak


WATCH_SHARE = 0.9
WATCH_INTERVAL_S = 2.0


class MemoryWatch:
    """Warns, once per phase, when this process's resident memory passes `share` of its
    budget: a daemon thread reads the RSS every `interval_s` (a sleep, not a spin), so the
    warning comes while the phase runs, naming it, before the kernel starts to swap."""

    def __init__(self, budget_bytes: int, warn, share: float = WATCH_SHARE,
                 interval_s: float = WATCH_INTERVAL_S, rss=None):
        self.budget_bytes, self.share, self.warn = budget_bytes, share, warn
        self.phase = "start-up"
        self._rss = rss or (lambda: psutil.Process().memory_info().rss)
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True,
                                        name="pbkd-memory-watch")
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.check()

    def check(self) -> bool:
        """Warn if over the share in a phase not warned about yet; True when it warned."""
        rss, phase = self._rss(), self.phase
        if rss <= self.share * self.budget_bytes or phase in self._warned:
            return False
        self._warned.add(phase)
        self.warn(f"resident memory {rss / 2**20:,.0f} MB in the {phase} phase is "
                  f"{rss / self.budget_bytes:.0%} of this rank's budget "
                  f"({self.budget_bytes / 2**20:,.0f} MB); past it the node may swap")
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
