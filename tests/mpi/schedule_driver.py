"""Work-stealing through the real protocol: one worker made slow, the others take its queue.

Run under mpiexec by tests/mpi/test_schedule_mpi.py:
    mpiexec -n 4 python tests/mpi/schedule_driver.py TASKS SECONDS SLOWDOWN [follow]
TASKS tasks of SECONDS each (estimated alike); rank 1 sleeps SLOWDOWN times as long in
each of its tasks. Rank 0 plans work-stealing (so each worker's queue starts with
TASKS / workers tasks), runs the tasks and prints one JSON line: the planned queues, who
ran what and when, and the makespan; each worker prints the tasks it executed. With
`follow`, rank 0 works on each result as acceptance does (a follow-up step of 0.05 s), and
every even-numbered task's step adds a task "tNN+more" (payload NN + 100) to the run.
"""

import json
import sys
import time

from mpi4py import MPI

from pbkd_mpi.mpi.protocol import Coordinator, Worker
from pbkd_mpi.schedule.planner import make_plan
from pbkd_mpi.schedule.scheduler import TaskEstimate


class FollowUp:
    """Rank 0's work on each result (mpi/protocol.Coordinator.run_tasks `follow_up`)."""

    def __init__(self, started: float):
        self.started, self.waiting, self.steps = started, [], []

    def arrived(self, task_id, result, record) -> None:
        if not task_id.endswith("+more"):
            self.waiting.append((task_id, result))

    def busy(self) -> bool:
        return bool(self.waiting)

    def step(self) -> dict:
        task_id, index = self.waiting.pop(0)
        self.steps.append(time.perf_counter() - self.started)
        time.sleep(0.05)
        return {f"{task_id}+more": (index + 100, 1.0, False)} if index % 2 == 0 else {}


def main():
    comm = MPI.COMM_WORLD
    count, seconds, slowdown = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    tasks = {f"t{i:02d}": i for i in range(count)}
    if comm.Get_rank() == 0:
        coordinator = Coordinator(comm)
        coordinator.broadcast("go")
        plan = make_plan([TaskEstimate(name, (seconds,)) for name in tasks],
                         tuple(coordinator.workers), "work-stealing")
        started = time.perf_counter()
        follow_up = FollowUp(started) if sys.argv[4:] == ["follow"] else None
        outcome = coordinator.run_tasks(
            tasks, plan.estimates, plan=plan, follow_up=follow_up,
            on_result=follow_up.arrived if follow_up else None)
        makespan = time.perf_counter() - started
        coordinator.finish()
        print(json.dumps({
            "role": "coordinator",
            "queues": {str(w): q for w, q in plan.queues.items()},
            "ran": {r.task_id: r.rank for r in outcome.records},
            "estimated": {r.task_id: r.estimated_s for r in outcome.records},
            "started_s": {r.task_id: r.start_s for r in outcome.records},
            "ended_s": {r.task_id: r.end_s for r in outcome.records},
            "makespan_s": makespan,
            "steps_s": follow_up.steps if follow_up else [],
        }), flush=True)
    else:
        worker = Worker(comm)
        worker.receive_job()
        executed = []
        slow = slowdown if comm.Get_rank() == 1 else 1.0

        def run(index):
            executed.append(index)
            time.sleep(seconds * slow)
            return index

        worker.run({}, lambda: worker.serve(run))
        print(json.dumps({"role": "worker", "rank": comm.Get_rank(), "executed": executed}),
              flush=True)


if __name__ == "__main__":
    main()
