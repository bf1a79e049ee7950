"""`python -m pbkd_mpi run [JOB] --print-job`: the job as a run would use it (every key,
defaults filled in, paths absolute), printed without running it; no MPI, no TensorFlow."""

from __future__ import annotations

from pbkd_mpi.config import load_job
from pbkd_mpi.errors import EXIT_OK
from pbkd_mpi.run_dir import job_toml


def print_job(args) -> int:
    print(job_toml(load_job(args.job, args.set, run_dir=args.run_dir)), end="")
    return EXIT_OK
