"""What waiting costs: an idle rank's CPU, and a task hand-out's round trip, under MPI.

Runs itself under `mpiexec -n 2`. Two measurements, each against its reference in the
same run:

  idle      rank 1 waits IDLE_S seconds for a message rank 0 sends only then, once with
            `protocol.receive` (iprobe + the doubling sleep of mpi/polling.py, as every
            wait in pbkd_mpi) and once with a blocking `comm.recv` (MPICH spins). The
            figure is the waiting rank's CPU seconds over the wall seconds.
  round trip  rank 1 plays a worker: it does WORK_S seconds of "training" (a sleep, so
            both back-offs have reached their cap, as between real tasks), sends READY
            and waits for the next TASK; rank 0 plays the coordinator, waiting with
            `protocol.receive` and answering at once. The figure is READY sent to TASK
            received on rank 1, median over ROUNDS rounds; the reference is the same with
            both sides in blocking calls.

Prints one JSON object, last line.

    python benchmarks/polling.py [--idle-s 5] [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK_S = 0.05


def idle_cpu_fraction(comm, idle_s: float, blocking: bool) -> float | None:
    from pbkd_mpi.mpi.protocol import Tag, receive, send

    comm.Barrier()
    if comm.rank == 0:
        time.sleep(idle_s)
        send(comm, "wake", 1, Tag.TASK)
        return None
    wall, cpu = time.monotonic(), time.process_time()
    if blocking:
        comm.recv(source=0, tag=int(Tag.TASK))
    else:
        receive(comm, source=0)
    return (time.process_time() - cpu) / (time.monotonic() - wall)


def round_trips(comm, rounds: int, blocking: bool) -> list[float]:
    from pbkd_mpi.mpi.protocol import Tag, receive, send

    comm.Barrier()
    times = []
    for _ in range(rounds):
        if comm.rank == 0:
            if blocking:
                comm.recv(source=1, tag=int(Tag.READY))
                comm.send("task", dest=1, tag=int(Tag.TASK))
            else:
                receive(comm, source=1)
                send(comm, "task", 1, Tag.TASK)
            continue
        time.sleep(WORK_S)
        start = time.monotonic()
        if blocking:
            comm.send(None, dest=0, tag=int(Tag.READY))
            comm.recv(source=0, tag=int(Tag.TASK))
        else:
            send(comm, None, 0, Tag.READY)
            receive(comm, source=0)
        times.append(time.monotonic() - start)
    return times


def measure(idle_s: float, rounds: int) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit(f"run under mpiexec -n 2, not {comm.size} ranks")
    backoff_idle = idle_cpu_fraction(comm, idle_s, blocking=False)
    blocking_idle = idle_cpu_fraction(comm, idle_s, blocking=True)
    backoff_trips = round_trips(comm, rounds, blocking=False)
    blocking_trips = round_trips(comm, rounds, blocking=True)
    if comm.rank == 1:
        backoff_ms = statistics.median(backoff_trips) * 1e3
        blocking_ms = statistics.median(blocking_trips) * 1e3
        print(json.dumps({
            "idle_s": idle_s, "rounds": rounds,
            "idle_cpu_fraction": round(backoff_idle, 4),
            "idle_cpu_fraction_blocking": round(blocking_idle, 4),
            "round_trip_ms": round(backoff_ms, 2),
            "round_trip_ms_p90": round(
                statistics.quantiles(backoff_trips, n=10)[-1] * 1e3, 2),
            "round_trip_ms_blocking": round(blocking_ms, 3),
        }), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        measure(args.idle_s, args.rounds)
        return 0
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = ["mpiexec", "-n", "2", sys.executable, __file__, "--inner",
               "--idle-s", str(args.idle_s), "--rounds", str(args.rounds)]
    return subprocess.run(command, env=env, timeout=600).returncode


if __name__ == "__main__":
    raise SystemExit(main())
