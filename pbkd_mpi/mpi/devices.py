"""Where each rank runs: node-local placement, its GPU, TensorFlow threads per rank, and a
check that the launcher started the world it announced.

The decisions are pure functions of explicit inputs (node-local rank, the visible GPUs, an
environment mapping) so they are unit-tested with faked environments:

- `choose_gpu(local_rank, visible_gpus, environ, use_gpu=True) -> GpuChoice`
- `local_rank_from_env(environ) -> int | None` (fallback when no MPI split is available)
- `check_world_size(actual, environ)` raises `UserError` when Slurm or the launcher
  announced a different number of ranks than MPI reports.

`configure_tensorflow` applies a choice; it must run before TensorFlow initialises its
runtime, because thread pools and visible devices are fixed at first use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence

from pbkd_mpi.errors import UserError


# Node-local rank, most specific first. A launcher's own variable comes before Slurm's:
# under `mpirun` inside an allocation the ranks inherit SLURM_LOCALID of the step that
# started the launcher's daemons, which says nothing about the ranks themselves.
LOCAL_RANK_VARS = (
    "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI
    "MPI_LOCALRANKID",  # MPICH (Hydra), Intel MPI
    "MV2_COMM_WORLD_LOCAL_RANK",  # MVAPICH2
    "PMI_LOCAL_RANK",  # some PMI implementations
    "SLURM_LOCALID",  # srun's task index on its node
)

# World size as announced by the launcher that started this process.
LAUNCHER_SIZE_VARS = (
    "OMPI_COMM_WORLD_SIZE",  # Open MPI's mpirun / prterun
    "PMI_SIZE",  # MPICH Hydra, Intel MPI, srun --mpi=pmi2
    "MV2_COMM_WORLD_SIZE",  # MVAPICH2
)

# Task count of the current Slurm job step (srun). SLURM_NTASKS alone is the allocation's
# count inside the batch script, so it only counts when this process is an srun task.
SLURM_STEP_SIZE_VAR = "SLURM_STEP_NUM_TASKS"


def node_cores() -> int:
    """Cores this process may use (its affinity mask, which Slurm and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def intra_op_threads() -> int:
    """TensorFlow's intra-op threads in this process (its default, 0, uses every core)."""
    import tensorflow as tf

    return tf.config.threading.get_intra_op_parallelism_threads() or node_cores()


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


# ---------------------------------------------------------------------------------------
# Pure decisions


def _int_var(environ: Mapping[str, str], name: str) -> int | None:
    """An environment variable as a non-negative int; None when unset. A set but malformed
    value is an error: silently ignoring it would place ranks wrongly."""
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise UserError(f"{name} should be a whole number, but it is {raw!r}.") from None
    if value < 0:
        raise UserError(f"{name} should be 0 or more, but it is {value}.")
    return value


def local_rank_from_env(environ: Mapping[str, str]) -> int | None:
    """Node-local rank from the launcher's or Slurm's variables (first of LOCAL_RANK_VARS
    that is set), or None when none is set."""
    for name in LOCAL_RANK_VARS:
        value = _int_var(environ, name)
        if value is not None:
            return value
    return None


def _id_list(raw: str | None) -> list[str] | None:
    """A comma-separated device list; None when unset. CUDA treats an empty value (and
    Slurm writes `NoDevFiles`) as "no devices", which is an empty list here."""
    if raw is None:
        return None
    raw = raw.strip()
    if raw in ("", "NoDevFiles"):
        return []
    return [item.strip() for item in raw.split(",") if item.strip()]


def device_ids(environ: Mapping[str, str]) -> list[str] | None:
    """IDs of the visible GPUs as NVML can address them, in CUDA's order: the entries of
    CUDA_VISIBLE_DEVICES (indices or `GPU-` UUIDs), else Slurm's SLURM_STEP_GPUS or
    SLURM_JOB_GPUS; None when nothing narrows the GPUs (then CUDA index = NVML index, given
    CUDA_DEVICE_ORDER=PCI_BUS_ID). NVML ignores CUDA_VISIBLE_DEVICES, hence this mapping."""
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        ids = _id_list(environ.get(name))
        if ids is not None:
            return ids
    return None


@dataclasses.dataclass(frozen=True)
class GpuChoice:
    """Which visible GPU a rank uses.

    visible_index: index into the visible GPU list (what TensorFlow lists), or None for CPU.
    device_id: the same GPU as NVML addresses it (an index or a `GPU-` UUID, see
        `device_ids`), for energy meters; None for CPU.
    hide_all: True when the rank must hide every GPU (it needs none, or there are none).
    reason: one line for the logs.
    """

    visible_index: int | None
    device_id: str | None
    hide_all: bool
    reason: str


def choose_gpu(local_rank: int | None, visible_gpus: Sequence, environ: Mapping[str, str],
               use_gpu: bool = True) -> GpuChoice:
    """Pick a rank's GPU. Rules, in order:

    1. a rank that needs no GPU hides them all (else TensorFlow reserves memory on each);
    2. no visible GPU: CPU;
    3. exactly one visible GPU (Slurm's per-task binding, or CUDA_VISIBLE_DEVICES set per
       rank): use it, whatever the local rank;
    4. otherwise node-local rank modulo the number of visible GPUs.

    local_rank None means "not known from MPI": the environment's local rank is used, and
    without one the rank cannot be placed among several GPUs, which is an error.
    """
    if not use_gpu:
        return GpuChoice(None, None, True, "no GPU needed: all GPUs hidden")
    count = len(visible_gpus)
    if count == 0:
        return GpuChoice(None, None, True, "no GPU visible: CPU")
    if count == 1:
        index, reason = 0, "the only visible GPU"
    else:
        if local_rank is None:
            local_rank = local_rank_from_env(environ)
        if local_rank is None:
            raise UserError(
                f"{count} GPUs are visible but this rank's node-local rank is unknown: expected "
                f"one of {', '.join(LOCAL_RANK_VARS)} to be set, and none is. Launch with "
                "mpirun/mpiexec or srun, or set CUDA_VISIBLE_DEVICES per rank.")
        index = local_rank % count
        reason = f"node-local rank {local_rank} modulo {count} visible GPUs"
    return GpuChoice(index, _device_id(index, count, environ), False, reason)


def _device_id(index: int, count: int, environ: Mapping[str, str]) -> str:
    ids = device_ids(environ)
    if ids is None or len(ids) != count:
        # Nothing narrows the GPUs (or the variables disagree with what CUDA lists, e.g.
        # cgroup-renumbered devices): CUDA's PCI-ordered index is NVML's index.
        return str(index)
    return ids[index]


def coordinator_trains(setting: str, own: tuple[str, str | None],
                       workers: Sequence[tuple[str, str | None]]) -> tuple[bool, str]:
    """Whether rank 0 should train block tasks too, and why. `own` and each of `workers`
    is (node name, GPU id or None for CPU), the GPU each rank chose. With `auto`, rank 0
    trains when its GPU is one no worker on its node uses: there are fewer workers than
    GPUs there, and that GPU would otherwise idle through the distillation."""
    if setting in ("yes", "no"):
        return setting == "yes", f"tasks.coordinator_trains = {setting}"
    node, gpu = own
    if gpu is None:
        return False, "rank 0 has no GPU"
    sharing = [index + 1 for index, (other_node, other_gpu) in enumerate(workers)
               if other_node == node and other_gpu == gpu]
    if sharing:
        return False, f"rank 0's GPU {gpu} is used by worker rank(s) {sharing}"
    return True, f"no worker rank uses rank 0's GPU {gpu} on {node}"


def check_world_size(actual: int, environ: Mapping[str, str]) -> None:
    """Raise UserError when the launcher or Slurm announced a different number of ranks
    than MPI reports (`actual`, i.e. COMM_WORLD's size).

    - A launcher's own size variable (LAUNCHER_SIZE_VARS) must equal `actual`.
    - Slurm's step task count (SLURM_STEP_NUM_TASKS, or SLURM_NTASKS in an srun task) is
      compared when no launcher variable is set, and always when MPI sees a single rank:
      Open MPI under srun without PMIx starts N separate 1-rank jobs. It is not compared
      otherwise because `mpirun` inside an allocation legitimately runs a different number
      of ranks than the allocation's, and its ranks inherit the daemons' step variables.
    """
    launcher = [(name, _int_var(environ, name)) for name in LAUNCHER_SIZE_VARS]
    launcher = [(name, value) for name, value in launcher if value is not None]
    for name, value in launcher:
        if value != actual:
            raise UserError(
                f"The launcher announced {value} ranks ({name}={value}) but MPI reports "
                f"{actual}. mpi4py is probably built against a different MPI than the "
                "mpirun/mpiexec that started it; see docs/install.md.")
    slurm_name, slurm_size = _slurm_step_size(environ)
    if slurm_size is None or slurm_size == actual:
        return
    if launcher and actual > 1:
        return
    raise UserError(
        f"Slurm started {slurm_size} tasks ({slurm_name}={slurm_size}) but MPI reports a world "
        f"of {actual} rank(s): the tasks did not join one MPI job. Under srun, pass the MPI "
        "plugin your MPI needs (srun --mpi=pmix for Open MPI 5 and recent MPICH; see "
        "`srun --mpi=list`), or launch with mpirun inside the allocation; see docs/hpc.md.")


def _slurm_step_size(environ: Mapping[str, str]) -> tuple[str, int | None]:
    step = _int_var(environ, SLURM_STEP_SIZE_VAR)
    if step is not None:
        return SLURM_STEP_SIZE_VAR, step
    # srun exports SLURM_NTASKS with the step's count to each task (SLURM_PROCID marks a
    # task); in the batch script itself it is the allocation's count.
    if environ.get("SLURM_PROCID") is not None:
        return "SLURM_NTASKS", _int_var(environ, "SLURM_NTASKS")
    return "SLURM_NTASKS", None


# ---------------------------------------------------------------------------------------
# TensorFlow


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
    # CUDA numbers GPUs fastest-first by default, NVML by PCI bus: align them so the GPU a
    # rank trains on is the GPU its energy meter reads. Read by CUDA at initialisation,
    # which comes after the import.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if os.environ.get("PBKD_TF_VERBOSE") == "1":
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_silenced():
        import tensorflow as tf
        import keras  # noqa: F401 - its import also prints through TensorFlow
    tf.get_logger().setLevel("ERROR")
    return tf


def configure_tensorflow(intra_threads: int, local_rank: int, inter_threads: int = 2, *,
                         use_gpu: bool = True, environ: Mapping[str, str] | None = None) -> str:
    """Set thread pools and pick this rank's GPU by `choose_gpu` (use_gpu=False hides all
    GPUs). Returns the device used, for the logs."""
    return configure_tensorflow_choice(intra_threads, local_rank, inter_threads,
                                       use_gpu=use_gpu, environ=environ)[0]


def configure_tensorflow_choice(intra_threads: int, local_rank: int | None,
                                inter_threads: int = 2, *, use_gpu: bool = True,
                                environ: Mapping[str, str] | None = None
                                ) -> tuple[str, GpuChoice]:
    """`configure_tensorflow`, also returning the GpuChoice (its device_id is what an
    energy meter needs)."""
    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(intra_threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_threads)
    gpus = tf.config.list_physical_devices("GPU")
    choice = choose_gpu(local_rank, gpus, os.environ if environ is None else environ, use_gpu)
    if choice.visible_index is None:
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return "cpu", choice
    gpu = gpus[choice.visible_index]
    tf.config.set_visible_devices([gpu], "GPU")
    # Without memory growth TensorFlow takes nearly all of the GPU's memory at start.
    tf.config.experimental.set_memory_growth(gpu, True)
    return gpu.name, choice
