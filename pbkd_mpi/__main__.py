import sys

from pbkd_mpi.mpi.supervisor import should_supervise, supervise

if should_supervise():  # under an MPI launcher: this process watches the real rank
    sys.exit(supervise(sys.argv[1:]))

from pbkd_mpi.cli import main  # noqa: E402 - the supervisor must not import MPI or TensorFlow

sys.exit(main())
