"""A load test of the task protocol alone: many short synthetic tasks, injected failures.

Run under mpiexec by tests/mpi/test_protocol.py:
    mpiexec -n 4 python tests/mpi/protocol_load.py TASKS SEED [POLICY]
Task i sleeps a random few milliseconds; every 10th task always raises (so it must end as
failed after max_attempts tries), every 10th+1 raises on odd ranks only (so a retry on an
even rank must rescue it). Rank 0 prints one JSON line with the outcome; every worker prints
one JSON line with the tasks it executed, so the test can count executions. After the
tasks, a collective phase sums the ranks with an allreduce on every rank, rank 0 included;
then a phase on the workers but the first alone sums their ranks on their own communicator,
each sending rank 0 a progress event first.
"""

import json
import random
import sys
import time

import numpy as np
import psutil
from mpi4py import MPI

from pbkd_mpi.mpi.collectives import allreduce_sum
from pbkd_mpi.mpi.protocol import Coordinator, Worker
from pbkd_mpi.schedule.planner import make_plan
from pbkd_mpi.schedule.scheduler import TaskEstimate


MAX_ATTEMPTS = 3


def handle(task, rank):
    index, seconds = task
    time.sleep(seconds)
    if index % 10 == 0 or (index % 10 == 1 and rank % 2 == 1):
        raise RuntimeError(f"injected failure of task {index} on rank {rank}")
    return {"index": index, "rank": rank}


def rank_sum(comm, check):
    (total,) = allreduce_sum(comm, [np.array([comm.Get_rank()], np.int64)], check)
    return int(total[0])


def main():
    comm = MPI.COMM_WORLD
    count, seed = int(sys.argv[1]), int(sys.argv[2])
    policy = sys.argv[3] if len(sys.argv) > 3 else None  # default: run_tasks' own plan
    rng = random.Random(seed)
    tasks = {f"t{i}": (i, rng.uniform(0.0, 0.02)) for i in range(count)}
    if comm.Get_rank() == 0:
        coordinator = Coordinator(comm)
        coordinator.broadcast("go")
        process = psutil.Process()
        cpu, wall = sum(process.cpu_times()[:2]), time.perf_counter()
        cost = {name: task[1] for name, task in tasks.items()}
        plan = None if policy is None else make_plan(
            [TaskEstimate(name, (cost[name],)) for name in tasks], tuple(coordinator.workers),
            policy)
        outcome = coordinator.run_tasks(tasks, cost, max_attempts=MAX_ATTEMPTS, plan=plan)
        cpu, wall = sum(process.cpu_times()[:2]) - cpu, time.perf_counter() - wall
        sums = coordinator.run_collective("rank_sum", None, lambda check: rank_sum(comm, check))
        events = []
        subset = coordinator.run_collective(
            "told_sum", None, ranks=tuple(coordinator.workers)[1:],
            on_progress=lambda rank, event: events.append([rank, event]))
        coordinator.finish()
        print(json.dumps({
            "role": "coordinator",
            "done": sorted(outcome.results),
            "failed": {name: [e["rank"] for e in errors]
                       for name, errors in outcome.failures.items()},
            "results_ok": all(r["index"] == tasks[n][0] for n, r in outcome.results.items()),
            "cpu_fraction": cpu / wall,
            "phase_values": [sums[rank] for rank in sorted(sums)],
            "subset_values": [subset[rank] for rank in sorted(subset)],
            "events": sorted(events),
        }), flush=True)
    else:
        worker = Worker(comm)
        worker.receive_job()
        executed = []

        def run(task):
            executed.append(task[0])
            return handle(task, comm.Get_rank())

        def told_sum(phase_comm):
            worker.send_progress(["summing", phase_comm.Get_rank()])
            return rank_sum(phase_comm, worker.abort_check)

        worker.run({"rank_sum": lambda _, phase_comm: rank_sum(phase_comm, worker.abort_check),
                    "told_sum": lambda _, phase_comm: told_sum(phase_comm)},
                   lambda: worker.serve(run))
        print(json.dumps({"role": "worker", "rank": comm.Get_rank(), "executed": executed}),
              flush=True)


if __name__ == "__main__":
    main()
