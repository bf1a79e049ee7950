"""`python -m pbkd_mpi`: under an MPI launcher, a supervisor process runs the real rank as
its child (mpi/supervisor.py); cli.py imports neither MPI nor TensorFlow before that."""

import sys

from pbkd_mpi.cli import entry

sys.exit(entry())
