"""Where each rank runs: node-local placement and TensorFlow threads per rank.

Must run before TensorFlow initialises its runtime: thread pools are fixed at first use.
"""

from __future__ import annotations

import contextlib
import os


def node_cores() -> int:
    """Cores this process may use (its affinity mask, which Slurm and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_layout(comm) -> tuple[int, int, bool]:
    """(node-local rank, ranks on this node, whether rank 0 shares this node), from a
    shared-memory split of the world. Collective: every rank calls it at start-up."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        root_here = bool(local.allreduce(comm.Get_rank() == 0, op=MPI.LOR))
        return local.Get_rank(), local.Get_size(), root_here
    finally:
        local.Free()


def worker_threads(requested: int, cores: int, local_size: int, root_on_node: bool) -> int:
    """Intra-op threads of a worker: as requested, or the node's cores shared among its
    workers (rank 0 sleeps while workers train, so it takes no share)."""
    if requested > 0:
        return requested
    workers = max(1, local_size - (1 if root_on_node else 0))
    return max(1, cores // workers)


@contextlib.contextmanager
def _stderr_silenced():
    """TensorFlow's C++ start-up lines come before its log settings apply: hide fd 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow():
    """Import TensorFlow without its start-up noise unless PBKD_TF_VERBOSE=1 asks for it."""
    if os.environ.get("PBKD_TF_VERBOSE") == "1":
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_silenced():
        import tensorflow as tf
        import keras  # noqa: F401 - its import also prints through TensorFlow
    tf.get_logger().setLevel("ERROR")
    return tf


def configure_tensorflow(intra_threads: int, local_rank: int, inter_threads: int = 2) -> str:
    """Set thread pools and pick this rank's GPU (node-local rank modulo the GPU count).
    Returns the device used, for the logs."""
    tf = import_tensorflow()

    tf.config.threading.set_intra_op_parallelism_threads(intra_threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_threads)
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    gpu = gpus[local_rank % len(gpus)]
    tf.config.set_visible_devices([gpu], "GPU")
    tf.config.experimental.set_memory_growth(gpu, True)
    return gpu.name
