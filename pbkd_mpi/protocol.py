"""The MPI shell: rank 0 hands out tasks, workers run them and send results back.

Nobody waits in a blocking MPI call. With MPICH a blocking receive spins a core at 100%,
which on a small node takes a core away from the workers; every wait here is a
non-blocking probe or test followed by a sleep that doubles up to a cap.

Messages (tags below) carry picklable payloads. A task's result and its failure travel
the same way back to rank 0: a worker that raises sends the traceback as text, and rank 0
raises it as a RemoteError naming the rank, so one clear message reaches the user.
"""

from __future__ import annotations

import enum
import time
import traceback
from dataclasses import dataclass, field

from mpi4py import MPI

from .errors import RemoteError

POLL_FIRST_S = 1e-4
POLL_CAP_S = 0.05  # tasks last seconds to hours: 50 ms of latency is invisible
ABORT_GRACE_S = 10.0  # how long rank 0 waits for workers to acknowledge an abort


class Tag(enum.IntEnum):
    JOB = 1  # rank 0 -> worker: what the run needs to know (job, cache location)
    READY = 2  # worker -> rank 0: give me a task
    TASK = 3  # rank 0 -> worker: (task id, task)
    RESULT = 4  # worker -> rank 0: (task id, result)
    ERROR = 5  # worker -> rank 0: (what it was doing, traceback text)
    STOP = 6  # rank 0 -> worker: no task left for you
    FINISH = 7  # rank 0 -> worker: the run is over, exit 0
    ABORT = 8  # rank 0 -> worker: exit now with the exit code in the payload
    ABORT_ACK = 9  # worker -> rank 0: leaving


class AbortRequested(Exception):
    """Rank 0 told this worker to leave; the payload is the exit code."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        super().__init__(f"abort requested by rank 0 (exit code {exit_code})")


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


def send(comm, payload, dest: int, tag: Tag) -> None:
    wait_request(comm.isend(payload, dest=dest, tag=int(tag)))


def receive(comm, source: int = MPI.ANY_SOURCE, deadline: float | None = None):
    """The next message from `source` as (tag, source, payload), or None at the deadline."""
    status = MPI.Status()
    backoff = Backoff()
    while not comm.iprobe(source=source, tag=MPI.ANY_TAG, status=status):
        if deadline is not None and time.monotonic() >= deadline:
            return None
        backoff.sleep()
    tag, origin = status.Get_tag(), status.Get_source()
    payload = comm.recv(source=origin, tag=tag)
    return Tag(tag), origin, payload


@dataclass
class TaskRecord:
    task_id: str
    rank: int
    start_s: float
    end_s: float = 0.0


@dataclass
class Coordinator:
    """Rank 0's side: broadcast the job, hand out tasks longest first, collect results."""

    comm: object
    epoch: float = field(default_factory=time.monotonic)

    @property
    def workers(self) -> range:
        return range(1, self.comm.Get_size())

    def now(self) -> float:
        return time.monotonic() - self.epoch

    def broadcast(self, payload, tag: Tag = Tag.JOB) -> None:
        requests = [self.comm.isend(payload, dest=rank, tag=int(tag)) for rank in self.workers]
        for request in requests:
            wait_request(request)

    def _next(self):
        message = receive(self.comm)
        tag, rank, payload = message
        if tag is Tag.ERROR:
            what, text = payload
            raise RemoteError(rank, what, text)
        return message

    def run_tasks(self, tasks: dict, cost: dict, on_result=None) -> tuple[dict, list[TaskRecord]]:
        """Run every task on the workers, longest estimated cost first, each worker pulling
        the next task when it is free. Returns ({task id: result}, [TaskRecord])."""
        pending = sorted(tasks, key=lambda task_id: cost[task_id], reverse=True)
        running: dict[int, TaskRecord] = {}
        results, records = {}, []
        stopped = set()
        while len(results) < len(tasks) or len(stopped) < len(self.workers):
            tag, rank, payload = self._next()
            if tag is Tag.RESULT:
                task_id, result = payload
                record = running.pop(rank)
                record.end_s = self.now()
                records.append(record)
                results[task_id] = result
                if on_result is not None:
                    on_result(task_id, result, record)
            elif tag is not Tag.READY:
                raise RuntimeError(f"unexpected message {tag.name} from rank {rank}")
            if pending:
                task_id = pending.pop(0)
                running[rank] = TaskRecord(task_id, rank, self.now())
                send(self.comm, (task_id, tasks[task_id]), rank, Tag.TASK)
            else:
                send(self.comm, None, rank, Tag.STOP)
                stopped.add(rank)
        return results, records

    def finish(self) -> None:
        self.broadcast(None, Tag.FINISH)

    def abort(self, exit_code: int) -> bool:
        """Tell every worker to leave and wait (bounded) for each to say so.
        Returns False when some worker did not answer in time."""
        requests = [self.comm.isend(exit_code, dest=rank, tag=int(Tag.ABORT))
                    for rank in self.workers]
        waiting = set(self.workers)
        deadline = time.monotonic() + ABORT_GRACE_S
        while waiting:
            message = receive(self.comm, deadline=deadline)
            if message is None:
                return False
            tag, rank, _ = message
            if tag is Tag.ABORT_ACK:
                waiting.discard(rank)
        for request in requests:
            wait_request(request)
        return True


class Worker:
    """A worker rank's side: receive the job, pull tasks until told to stop."""

    def __init__(self, comm):
        self.comm = comm

    def _from_root(self):
        tag, _, payload = receive(self.comm, source=0)
        if tag is Tag.ABORT:
            raise AbortRequested(payload)
        return tag, payload

    def receive_job(self):
        tag, payload = self._from_root()
        if tag is Tag.FINISH:
            return None
        if tag is not Tag.JOB:
            raise RuntimeError(f"expected the job from rank 0, received {tag.name}")
        return payload

    def serve(self, handle) -> int:
        """Run `handle(task)` for each task rank 0 sends; returns the number run."""
        send(self.comm, None, 0, Tag.READY)
        count = 0
        while True:
            tag, payload = self._from_root()
            if tag is Tag.STOP:
                return count
            if tag is not Tag.TASK:
                raise RuntimeError(f"expected a task from rank 0, received {tag.name}")
            task_id, task = payload
            try:
                result = handle(task)
            except AbortRequested:
                raise
            except Exception:
                self.report_error(f"running task {task_id}", traceback.format_exc())
                # Rank 0 decides what happens next; until then wait for its word.
                continue
            send(self.comm, (task_id, result), 0, Tag.RESULT)
            count += 1

    def wait_for_end(self) -> None:
        tag, _ = self._from_root()
        if tag is not Tag.FINISH:
            raise RuntimeError(f"expected the end of the run from rank 0, received {tag.name}")

    def report_error(self, what: str, text: str) -> None:
        send(self.comm, (what, text), 0, Tag.ERROR)

    def acknowledge_abort(self) -> None:
        send(self.comm, None, 0, Tag.ABORT_ACK)

    def abort_check(self) -> None:
        """Raise AbortRequested when rank 0 has sent ABORT; cheap enough to call per batch."""
        if self.comm.iprobe(source=0, tag=int(Tag.ABORT)):
            raise AbortRequested(self.comm.recv(source=0, tag=int(Tag.ABORT)))
