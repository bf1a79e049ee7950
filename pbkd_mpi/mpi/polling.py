"""Waiting without spinning: a sleep that doubles up to a cap between non-blocking tests.

With MPICH a blocking receive or collective spins its core at 100% while it waits, which
on a small node takes a core away from the workers. Every wait in pbkd_mpi is a
non-blocking probe or test followed by `Backoff.sleep`.
"""

from __future__ import annotations

import time

POLL_FIRST_S = 1e-4
POLL_CAP_S = 0.005  # a 5 ms sleep between probes costs well under 1% of a core


class Backoff:
    def __init__(self, first: float = POLL_FIRST_S, cap: float = POLL_CAP_S):
        self.first, self.cap, self.delay = first, cap, first

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


def wait_request(request) -> object:
    """Complete a non-blocking request without spinning; returns its message if any."""
    backoff = Backoff()
    while True:
        done, message = request.test()
        if done:
            return message
        backoff.sleep()
