"""Work-stealing through the real protocol: one worker made slow, the others take its queue.

Run under mpiexec by tests/mpi/test_schedule_mpi.py:
    mpiexec -n 4 python tests/mpi/schedule_driver.py TASKS SECONDS SLOWDOWN
TASKS tasks of SECONDS each (estimated alike); rank 1 sleeps SLOWDOWN times as long in
each of its tasks. Rank 0 plans work-stealing (so each worker's queue starts with
TASKS / workers tasks), runs the tasks and prints one JSON line: the planned queues, who
ran what and when, and the makespan; each worker prints the tasks it executed.
"""

import json
import sys
import time

from mpi4py import MPI

from pbkd_mpi.mpi.protocol import Coordinator, Worker
from pbkd_mpi.schedule.planner import make_plan
from pbkd_mpi.schedule.scheduler import TaskEstimate


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
        outcome = coordinator.run_tasks(tasks, plan.estimates, plan=plan)
        makespan = time.perf_counter() - started
        coordinator.finish()
        print(json.dumps({
            "role": "coordinator",
            "queues": {str(w): q for w, q in plan.queues.items()},
            "ran": {r.task_id: r.rank for r in outcome.records},
            "estimated": {r.task_id: r.estimated_s for r in outcome.records},
            "makespan_s": makespan,
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
