"""Collective operations that never spin: non-blocking MPI collectives completed by polling.

With MPICH a blocking `Allreduce` or `Barrier` spins its core while it waits for the slowest
rank. Each collective here starts the non-blocking variant and tests it with the same
back-off as the task protocol. `check()` runs between tests: rank 0 passes one that raises
when a worker reported an error (so a failed rank never leaves the others waiting in a
collective forever), a worker one that raises when rank 0 asked it to abort.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from mpi4py import MPI

from pbkd_mpi.mpi.polling import Backoff

Check = Callable[[], None] | None


# Per-step gradient averaging waits for the other ranks' few-millisecond steps: the default
# back-off (cap 5 ms) made one 2-rank allreduce of 24k floats take 17 ms here, a 0.5 ms cap
# 2 ms. Callers inside a training loop pass cap_s=STEP_POLL_CAP_S.
STEP_POLL_CAP_S = 5e-4


def wait(request, check: Check = None, cap_s: float | None = None) -> None:
    backoff = Backoff() if cap_s is None else Backoff(min(1e-5, cap_s), cap_s)
    while not request.Test():
        if check is not None:
            check()
        backoff.sleep()


def barrier(comm, check: Check = None) -> None:
    wait(comm.Ibarrier(), check)


def allreduce_sum(comm, arrays, check: Check = None, cap_s: float | None = None
                  ) -> list[np.ndarray]:
    """Element-wise sums over the ranks of `comm`, in float64 (the order of additions is
    fixed by MPI, so every rank gets bit-identical sums)."""
    arrays = [np.asarray(a) for a in arrays]
    flat = np.concatenate([a.astype(np.float64).ravel() for a in arrays]) if arrays else \
        np.zeros(0)
    total = np.empty_like(flat)
    wait(comm.Iallreduce(flat, total, op=MPI.SUM), check, cap_s)
    out, offset = [], 0
    for a in arrays:
        out.append(total[offset:offset + a.size].reshape(a.shape).astype(a.dtype, copy=False))
        offset += a.size
    return out


def allreduce_mean(comm, arrays, check: Check = None, cap_s: float | None = None
                   ) -> list[np.ndarray]:
    size = comm.Get_size()
    return [a / size for a in allreduce_sum(comm, arrays, check, cap_s)]


def broadcast_arrays(comm, arrays, root: int = 0, check: Check = None) -> list[np.ndarray]:
    """`root`'s arrays on every rank (shapes and dtypes must already agree)."""
    # np.array, not np.ascontiguousarray: that makes a scalar weight (a custom layer's
    # learned factor, shape ()) one of shape (1,), which set_weights then refuses.
    out = [np.array(a, order="C", copy=True) for a in arrays]
    for a in out:
        if a.size:
            wait(comm.Ibcast(a, root=root), check)
    return out


def gather_objects(comm, value, root: int = 0, check: Check = None):
    """Picklable values from every rank, as a list on `root` (None elsewhere), polling."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != root:
        wait(comm.isend(value, dest=root, tag=77), check)
        return None
    values = [None] * size
    values[root] = value
    for source in range(size):
        if source == root:
            continue
        status = MPI.Status()
        backoff = Backoff()
        while not comm.iprobe(source=source, tag=77, status=status):
            if check is not None:
                check()
            backoff.sleep()
        values[source] = comm.recv(source=source, tag=77)
    return values
