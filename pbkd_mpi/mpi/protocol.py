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
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from pbkd_mpi.errors import EXIT_FAILURE, PbkdError, RemoteError
from pbkd_mpi.mpi import preemption
from pbkd_mpi.mpi.polling import Backoff, wait_request
from pbkd_mpi.schedule.planner import make_plan
from pbkd_mpi.schedule.scheduler import Scheduler, TaskEstimate

ABORT_GRACE_S = 10.0  # how long rank 0 waits for workers to acknowledge an abort
SIGNAL_CHECK_S = 0.5  # how often rank 0's task loop looks for a termination signal


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
    PREEMPTED = 10  # worker -> rank 0: a signal arrived while it trained (payload: name)
    HEARTBEAT = 12  # worker -> rank 0, from a thread, from the job to the end: still alive
    PHASE = 13  # rank 0 -> worker: run a collective phase (name, payload); RESULT answers
    SERVE = 14  # rank 0 -> worker: start pulling tasks (READY ... STOP)
    PROGRESS = 15  # worker -> rank 0, inside a phase: an event for rank 0's progress display


class WorkerLost(PbkdError):
    """A worker stopped answering (hung, stopped, or its node is gone)."""


class AbortRequested(Exception):
    """Rank 0 told this worker to leave; the payload is the exit code."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        super().__init__(f"abort requested by rank 0 (exit code {exit_code})")


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
    rank: int  # the worker that trained it (a split task: the first of its workers)
    start_s: float
    end_s: float = 0.0
    ranks: tuple = ()  # every worker that trained it (more than one: a split task)
    estimated_s: float | None = None  # the schedule's estimate when it was handed out
    waiting: set = field(default_factory=set)  # split task: workers whose result is due
    replicas_identical: bool | None = None  # split task: every worker returned the same weights

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass
class TaskOutcome:
    results: dict = field(default_factory=dict)  # task id -> result
    records: list = field(default_factory=list)  # TaskRecord of each task that succeeded
    failures: dict = field(default_factory=dict)  # task id -> [{rank, error, traceback}]
    plan: object = None  # the schedule/scheduler.Plan the tasks followed


@dataclass(frozen=True)
class SplitPart:
    """A worker's part of a split task: train `task` data-parallel with `ranks`. The worker
    fills in `comm`, the sub-communicator of those ranks (never pickled: made on arrival)."""

    task: object
    ranks: tuple
    comm: object = field(default=None, compare=False)

    def __getstate__(self):
        return {"task": self.task, "ranks": self.ranks, "comm": None}

    def __setstate__(self, state):
        for key, value in state.items():
            object.__setattr__(self, key, value)


def default_plan(tasks: dict, cost: dict, workers):
    """Work-stealing without splitting on `cost` (its units do not matter, only its order)."""
    return make_plan([TaskEstimate(name, (float(cost[name]),)) for name in tasks],
                     tuple(workers), "work-stealing")


@dataclass
class Coordinator:
    """Rank 0's side: broadcast the job, hand out tasks longest first, collect results."""

    comm: object
    epoch: float = field(default_factory=time.monotonic)
    silence_limit_s: float | None = None  # set from the job: a worker this quiet is lost
    heard: dict = field(default_factory=dict)  # worker rank -> when it last said anything
    devices: dict = field(default_factory=dict)  # rank -> (node, GPU id or None), once placed
    local: "LocalWorker | None" = None  # rank 0's own training thread, when it has a GPU
    max_poll_gap_s: float = 0.0  # the longest rank 0 went without looking for messages

    @property
    def workers(self) -> range:
        return range(1, self.comm.Get_size())

    @property
    def task_workers(self) -> tuple:
        """The ranks that take tasks: the workers, and rank 0 when it trains too."""
        return ((0,) if self.local is not None else ()) + tuple(self.workers)

    @property
    def compute_ranks(self) -> tuple | None:
        """`run_collective`'s `ranks` for a phase that computes where tasks train: None
        (every rank) when rank 0 trains too, else the workers. On a node whose cores or
        GPUs the workers already fill, rank 0 beside them would share a worker's: its part
        would take twice as long, and every step of a synchronous phase waits for it. A
        world of rank 0 alone (tests) computes there too."""
        return None if self.local is not None or not self.workers else tuple(self.workers)

    def send_task(self, message, ranks) -> None:
        """TASK to each of `ranks` (rank 0: its own training thread), all sent before any
        is waited on, so that the workers of a split task start together."""
        if 0 in ranks:
            self.local.send(message, Tag.TASK)
        requests = [self.comm.isend(message, dest=rank, tag=int(Tag.TASK))
                    for rank in ranks if rank != 0]
        for request in requests:
            wait_request(request)

    def send_stop(self, rank: int) -> None:
        if rank == 0:
            self.local.send(None, Tag.STOP)
        else:
            send(self.comm, None, rank, Tag.STOP)

    def _receive(self, deadline: float):
        """The next message from a worker rank or from rank 0's own thread, as
        (tag, rank, payload), or None at the deadline. Notes the longest gap between two
        looks: with rank 0 training in a thread, that is its coordination latency."""
        status = MPI.Status()
        backoff = Backoff()
        last = time.monotonic()
        while True:
            now = time.monotonic()
            self.max_poll_gap_s = max(self.max_poll_gap_s, now - last)
            last = now
            if self.local is not None and (message := self.local.poll()) is not None:
                return message
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                tag, origin = status.Get_tag(), status.Get_source()
                return Tag(tag), origin, self.comm.recv(source=origin, tag=tag)
            if now >= deadline:
                return None
            backoff.sleep()

    def now(self) -> float:
        return time.monotonic() - self.epoch

    def broadcast(self, payload, tag: Tag = Tag.JOB) -> None:
        requests = [self.comm.isend(payload, dest=rank, tag=int(tag)) for rank in self.workers]
        for request in requests:
            wait_request(request)

    def run_tasks(self, tasks: dict, cost: dict, on_result=None, on_failure=None,
                  max_attempts: int = 1, on_dispatch=None,
                  silence_limit_s: float | None = None, plan=None,
                  follow_up=None) -> "TaskOutcome":
        """Run every task on the workers as `plan` (a schedule/scheduler.Plan over these
        worker ranks) says; without one, work-stealing on `cost` without splitting. A task
        that raises on a worker is tried again on another worker, up to `max_attempts`
        tries in all; one that still fails is given up (`on_failure(task_id, errors)`) and
        the others go on. A split task goes to its workers together as a `SplitPart` each;
        every one of them answers and the first's result is kept (their weights are
        identical); one that fails ends the run, because its partners are waiting in its
        allreduce. A signal (see preemption) stops the hand-out and raises Preempted once
        the workers are told.

        `follow_up`: rank 0's own work on the results as they arrive (acceptance), done
        whenever no message waits: `busy()` says there is some, `step()` does one piece and
        returns {task_id: (task, estimate, first)} to run too (`first`: ahead of every
        queued task). The workers are not stopped while it is busy, since a step may add
        tasks."""
        self.broadcast(None, Tag.SERVE)
        if self.local is not None:
            self.local.serve()
        self.epoch = time.monotonic()  # task start and end times count from here
        plan = plan if plan is not None else default_plan(tasks, cost, self.task_workers)
        hand_out = _HandOut(self, dict(tasks), plan, max_attempts, on_result, on_failure,
                            on_dispatch, follow_up)
        limit_s = silence_limit_s if silence_limit_s is not None else self.silence_limit_s
        for rank in self.task_workers:
            self.heard[rank] = time.monotonic()
        try:
            while len(hand_out.stopped) < len(self.task_workers):
                busy = hand_out.follow_up_busy()
                message = self._receive(
                    deadline=time.monotonic() + (0.0 if busy else SIGNAL_CHECK_S))
                preemption.check(f"{len(hand_out.running)} block task(s) were running")
                self._check_alive(self.heard, hand_out.running, hand_out.stopped, limit_s)
                if message is not None:
                    if (message := self._note(message)) is not None:
                        hand_out.take(*message)
                elif busy:  # nothing waiting: rank 0's own work, a piece at a time
                    hand_out.follow(follow_up.step())
            return hand_out.outcome
        finally:
            if self.local is not None:
                self.local.cancel()  # a no-op after STOP; else it stops its task

    def _note(self, message):
        """What every message says: its rank is alive. HEARTBEAT says nothing more (None is
        returned); PREEMPTED stops the run; any other message is the caller's to take."""
        tag, rank, payload = message
        self.heard[rank] = time.monotonic()
        if tag is Tag.HEARTBEAT:
            return None
        if tag is Tag.PREEMPTED:
            raise preemption.Preempted(f"rank {rank}: {payload}")
        return message

    def _check_alive(self, heard, running, stopped, limit_s, phase: str = "") -> None:
        if limit_s is None:
            return
        now = time.monotonic()
        for rank in self.workers:
            if rank not in stopped and now - heard[rank] > limit_s:
                doing = (f"while training block {running[rank].task_id}" if rank in running
                         else f"during {phase}" if phase else "while waiting for a task")
                raise WorkerLost(
                    f"rank {rank} stopped answering {doing}: "
                    f"nothing from it for {now - heard[rank]:.0f} s (tasks.silence_limit_s = "
                    f"{limit_s:g}). Finished blocks are saved in the run directory; run the "
                    f"same command again to resume.")

    def run_collective(self, name: str, payload=None, local=None, ranks=None,
                       on_progress=None) -> dict:
        """Run phase `name`: each worker runs its registered handler (see phases) with
        `payload` and a communicator, rank 0 runs `local(check)`. `ranks`: None, every rank
        on the world communicator (rank 0 included: its collectives pair with the
        workers'); or the worker ranks that compute, on a communicator of their own, while
        rank 0 only waits (`local` must then be None) and the other workers answer None.
        `check` raises as soon as a worker reports a failure, a worker falls silent or a
        signal arrives, so rank 0 never waits on a dead rank. `on_progress(rank, event)`
        takes the PROGRESS messages the phase sends. Returns {rank: value}, rank 0's under
        0."""
        if ranks is not None and (0 in ranks or local is not None):
            raise ValueError(f"phase {name!r}: `ranks` names worker ranks only, and rank 0 "
                             f"runs no `local` part beside them; got {ranks} and {local}")
        self.broadcast((name, payload, None if ranks is None else tuple(ranks)), Tag.PHASE)
        values: dict[int, object] = {}
        for rank in self.workers:
            self.heard.setdefault(rank, time.monotonic())

        def take(message) -> None:
            if (message := self._note(message)) is None:
                return
            tag, rank, event = message
            if tag is Tag.PROGRESS:
                if on_progress is not None:
                    on_progress(rank, event)
            else:
                self._take_phase_message(name, message, values)

        def check():
            preemption.check(f"running the {name} phase")
            # Drain first: heartbeats queue up while rank 0 computes between phases.
            while (message := receive(self.comm, deadline=0.0)) is not None:
                take(message)
            self._check_alive(self.heard, {}, set(values), self.silence_limit_s, name)

        values[0] = local(check) if local is not None else None
        while len(values) < self.comm.Get_size():
            message = receive(self.comm, deadline=time.monotonic() + SIGNAL_CHECK_S)
            if message is not None:  # before check() drains the ones sent after it
                take(message)
            check()
        return values

    def _take_phase_message(self, name, message, values) -> None:
        tag, rank, payload = message
        if tag is Tag.ERROR:
            raise RemoteError(rank, *payload)
        if tag is not Tag.RESULT or payload[0] != name:
            raise RuntimeError(f"expected the result of phase {name!r} from rank {rank}, "
                               f"received {tag.name}")
        values[rank] = payload[1]

    def finish(self) -> None:
        self.broadcast(None, Tag.FINISH)

    def abort(self, exit_code: int) -> bool:
        """Tell every worker to leave and wait (bounded) for each to say so.
        Returns False when some worker did not answer in time."""
        self.broadcast(exit_code, Tag.ABORT)  # small messages: sent even to a dead rank
        waiting = set(self.workers)
        deadline = time.monotonic() + ABORT_GRACE_S
        while waiting:
            message = receive(self.comm, deadline=deadline)
            if message is None:
                return False
            tag, rank, _ = message
            if tag is Tag.ABORT_ACK:
                waiting.discard(rank)
        return True


class _HandOut:
    """One `run_tasks` call on rank 0: the Scheduler, which worker runs what, the outcome.
    `take` handles the task loop's messages: READY, and a task's RESULT or ERROR."""

    def __init__(self, coordinator, tasks, plan, max_attempts, on_result, on_failure,
                 on_dispatch, follow_up=None):
        self.coordinator, self.tasks, self.follow_up = coordinator, tasks, follow_up
        self.queue = Scheduler(plan, max_attempts)
        self.idle: set[int] = set()
        self.running: dict[int, TaskRecord] = {}
        self.stopped: set[int] = set()
        self.outcome = TaskOutcome(plan=plan)
        self.on_result, self.on_failure, self.on_dispatch = on_result, on_failure, on_dispatch

    def take(self, tag: Tag, rank: int, payload) -> None:
        if tag is Tag.ERROR and (rank not in self.running or len(self.running[rank].ranks) > 1):
            raise RemoteError(rank, *payload)
        if tag in (Tag.RESULT, Tag.ERROR):
            record = self.running.pop(rank)
            record.waiting.discard(rank)
            if tag is Tag.RESULT and len(record.ranks) > 1:
                _compare_replica(record, self.outcome.results, payload[1])
            if not record.waiting:  # else a split task's other workers have yet to answer
                record.end_s = self.coordinator.now()
                if tag is Tag.RESULT:
                    self._succeeded(record, payload[1])
                else:
                    self._failed(record, rank, payload[1])
        elif tag is not Tag.READY:
            raise RuntimeError(f"unexpected message {tag.name} from rank {rank}")
        self.idle.add(rank)
        if self.follow_up_busy():  # what the result asked for goes in before the hand-out
            self.follow(self.follow_up.step())
        else:
            self.dispatch()

    def follow_up_busy(self) -> bool:
        return self.follow_up is not None and self.follow_up.busy()

    def follow(self, added: dict) -> None:
        """Schedule the tasks a follow-up step asked for, then hand out (or stop) as ever."""
        for task_id, (task, estimate, first) in added.items():
            self.tasks[task_id] = task
            self.queue.add(task_id, estimate, first, prefer=self.idle)
        self.dispatch()

    def _succeeded(self, record, result) -> None:
        task_id = record.task_id
        result = self.outcome.results.setdefault(task_id, result)
        self.outcome.records.append(record)
        self.queue.done(task_id, record.ranks, record.seconds)
        if self.on_result is not None:
            self.on_result(task_id, result, record)

    def _failed(self, record, rank, text) -> None:
        errors = self.queue.failed(record.task_id, rank, text)
        if errors is not None:
            self.outcome.failures[record.task_id] = errors
            if self.on_failure is not None:
                self.on_failure(record.task_id, errors)

    def dispatch(self) -> None:
        """Hand the idle workers what the Scheduler says; STOP them when nothing is left."""
        coordinator = self.coordinator
        available = [r for r in coordinator.task_workers if r not in self.stopped]
        for task_id, ranks in self.queue.assign(self.idle, available):
            record = TaskRecord(task_id, ranks[0], coordinator.now(), ranks=tuple(ranks),
                                estimated_s=self.queue.estimates[task_id], waiting=set(ranks))
            for rank in ranks:
                self.idle.discard(rank)
                self.running[rank] = record
            task = self.tasks[task_id]
            coordinator.send_task((task_id, task if len(ranks) == 1 else
                                   SplitPart(task, tuple(ranks))), ranks)
            if self.on_dispatch is not None:
                for rank in ranks:
                    self.on_dispatch(task_id, rank)
        if self.queue.empty() and not self.running and not self.follow_up_busy():
            for rank in sorted(self.idle):
                self.idle.discard(rank)
                self.stopped.add(rank)
                coordinator.send_stop(rank)
        # else: idle workers wait: for a running task that may fail and need another
        # worker, for a split task's workers to be free together, or (fixed policies) for
        # nothing, until every task has ended


def _compare_replica(record, results, result) -> None:
    """Keep a split task's first result; note whether each later one has the same
    weights (data-parallel training keeps them identical, bit for bit)."""
    first = results.setdefault(record.task_id, result)
    if first is result:
        return
    same = first["weights"].keys() == result["weights"].keys() and all(
        len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
        for a, b in ((first["weights"][k], result["weights"][k]) for k in first["weights"]))
    record.replicas_identical = same and record.replicas_identical is not False


class LocalWorker:
    """Rank 0's own worker: a thread that trains tasks on the GPU no worker rank uses
    while the main thread goes on coordinating. It speaks the task protocol through two
    queues instead of MPI: from each `serve` (rank 0's SERVE), READY first, then RESULT or
    ERROR for each TASK, until STOP; a run hands out tasks several times (the parallel
    phase, acceptance's wider students, the chained pass), so each `serve` starts a
    thread. `make_runner(stop_check)` builds its `run(task)`; `stop_check` raises between
    batches once rank 0 gives up on the hand-out (an abort or a signal), so the thread
    leaves."""

    def __init__(self, make_runner):
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self.run_task = make_runner(self.stop_check)
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """Start pulling tasks, as a worker rank does on SERVE."""
        if self._thread is not None:
            self._thread.join()  # STOPped, or cancelled: it leaves at its next batch
        self.inbox, self.outbox = queue.Queue(), queue.Queue()
        self._cancelled.clear()
        self.outbox.put((Tag.READY, 0, None))
        self._thread = threading.Thread(target=self._serve, name="pbkd-rank0-worker",
                                        daemon=True)
        self._thread.start()

    def stop_check(self) -> None:
        if self._cancelled.is_set():
            raise AbortRequested(EXIT_FAILURE)

    def send(self, payload, tag: Tag) -> None:
        self.inbox.put((tag, payload))

    def poll(self):
        try:
            return self.outbox.get_nowait()
        except queue.Empty:
            return None

    def cancel(self) -> None:
        self._cancelled.set()
        self.inbox.put((Tag.STOP, None))

    def _serve(self) -> None:
        while True:
            tag, payload = self.inbox.get()
            if tag is not Tag.TASK:
                return
            task_id, task = payload
            try:
                result = self.run_task(task)
            except AbortRequested:
                return
            except preemption.Preempted as stop:
                self.outbox.put((Tag.PREEMPTED, 0, str(stop)))
                return
            except Exception:  # noqa: BLE001 - reported like a worker rank's failure
                self.outbox.put((Tag.ERROR, 0, (f"running task {task_id}",
                                                traceback.format_exc())))
                continue
            self.outbox.put((Tag.RESULT, 0, (task_id, result)))


_FAILED = object()  # Worker._attempt: the work failed and rank 0 was told


def _run_phase(handlers: dict, name: str, argument, comm):
    if name not in handlers:
        raise RuntimeError(f"rank 0 asked for phase {name!r}; this worker knows "
                           f"{sorted(handlers)}")
    return handlers[name](argument, comm)


class Worker:
    """A worker rank's side: receive the job, pull tasks until told to stop."""

    def __init__(self, comm):
        self.comm = comm
        self._heart: threading.Thread | None = None
        self._beating = threading.Event()

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

    def run(self, handlers: dict, serve) -> None:
        """Follow rank 0 until FINISH: run each collective phase it names with
        `handlers[name](payload, comm)`, and `serve()` (pull tasks) when it says SERVE.
        `comm` is the world communicator, or the communicator of the phase's ranks when
        rank 0 named some (a worker outside them answers None at once). A phase that
        raises is reported; rank 0 then ends the job with ABORT."""
        while True:
            tag, payload = self._from_root()
            if tag is Tag.FINISH:
                return
            if tag is Tag.SERVE:
                serve()
            elif tag is Tag.PHASE:
                name, argument, ranks = payload
                value = self._attempt(f"running phase {name}", self._phase, handlers, name,
                                      argument, ranks)
                if value is not _FAILED:
                    send(self.comm, (name, value), 0, Tag.RESULT)
            else:
                raise RuntimeError(f"expected a phase, tasks or the end from rank 0, "
                                   f"received {tag.name}")

    def _phase(self, handlers: dict, name: str, argument, ranks):
        if ranks is None:
            return _run_phase(handlers, name, argument, self.comm)
        if self.comm.Get_rank() not in ranks:
            return None
        sub = self._join(ranks)
        try:
            return _run_phase(handlers, name, argument, sub)
        finally:
            sub.Free()

    def send_progress(self, event) -> None:
        """A PROGRESS event for rank 0's display (Coordinator.run_collective's
        `on_progress`)."""
        send(self.comm, event, 0, Tag.PROGRESS)

    def start_heartbeat(self, interval_s: float) -> None:
        """Tell rank 0 every `interval_s` that this rank is alive, from a thread, so that
        a long task on a busy core still answers (MPI runs with THREAD_MULTIPLE)."""
        self._beating.clear()

        def beat():
            while not self._beating.wait(interval_s):
                send(self.comm, None, 0, Tag.HEARTBEAT)

        self._heart = threading.Thread(target=beat, name="pbkd-heartbeat", daemon=True)
        self._heart.start()

    def stop_heartbeat(self) -> None:
        if self._heart is not None:
            self._beating.set()
            self._heart.join()
            self._heart = None

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
            result = self._attempt(f"running task {task_id}", self._run_task, handle, task)
            if result is not _FAILED:
                send(self.comm, (task_id, result), 0, Tag.RESULT)
                count += 1

    def _attempt(self, what: str, work, *args):
        """`work(*args)`, or `_FAILED` once its failure is reported to rank 0, which
        decides what happens next (another task, or ABORT); until then this rank waits
        for its word."""
        try:
            return work(*args)
        except AbortRequested:
            raise
        except preemption.Preempted as stop:
            send(self.comm, str(stop), 0, Tag.PREEMPTED)  # rank 0 answers with ABORT
        except Exception:
            self.report_error(what, traceback.format_exc())
        return _FAILED

    def _run_task(self, handle, task):
        if not isinstance(task, SplitPart):
            return handle(task)
        sub = self._join(task.ranks)
        try:
            return handle(SplitPart(task.task, task.ranks, sub))
        finally:
            sub.Free()

    def _join(self, ranks):
        """The communicator of a split task's or a phase's ranks. MPI_Comm_create_group
        has no non-blocking form, but it only waits for these ranks, which rank 0 sent the
        task to at the same moment, so the wait is about one message's time."""
        group = self.comm.Get_group().Incl(list(ranks))
        try:
            return self.comm.Create_group(group, tag=int(Tag.TASK))
        finally:
            group.Free()

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
