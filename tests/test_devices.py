"""GPU choice, local rank and world-size checks with faked environments (no GPU here)."""

import pytest

from pbkd_mpi.errors import UserError
from pbkd_mpi.mpi.devices import (GpuChoice, check_world_size, choose_gpu, device_ids,
                                  local_rank_from_env, worker_threads)


FOUR = ["GPU:0", "GPU:1", "GPU:2", "GPU:3"]


# --- local rank ------------------------------------------------------------------------

def test_local_rank_absent_is_none():
    assert local_rank_from_env({}) is None


@pytest.mark.parametrize("name", ["SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK",
                                  "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"])
def test_local_rank_from_each_launcher(name):
    assert local_rank_from_env({name: "3"}) == 3


def test_launcher_local_rank_wins_over_slurm():
    # mpirun inside an allocation: the ranks inherit the daemon step's SLURM_LOCALID=0.
    env = {"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    assert local_rank_from_env(env) == 2


def test_malformed_local_rank_is_a_clear_error():
    with pytest.raises(UserError, match=r"SLURM_LOCALID should be a whole number, but it is 'x'"):
        local_rank_from_env({"SLURM_LOCALID": "x"})


# --- GPU choice ------------------------------------------------------------------------

def test_rank_that_needs_no_gpu_hides_them():
    choice = choose_gpu(1, FOUR, {}, use_gpu=False)
    assert choice == GpuChoice(None, None, True, choice.reason)
    assert "hidden" in choice.reason


def test_no_gpu_means_cpu():
    choice = choose_gpu(3, [], {"SLURM_LOCALID": "3"})
    assert choice.visible_index is None and choice.device_id is None and choice.hide_all


def test_single_visible_gpu_is_used_whatever_the_local_rank():
    # Slurm per-task binding: each task sees only its own GPU, physically number 2.
    choice = choose_gpu(5, ["GPU:0"], {"CUDA_VISIBLE_DEVICES": "2", "SLURM_LOCALID": "5"})
    assert (choice.visible_index, choice.device_id, choice.hide_all) == (0, "2", False)


@pytest.mark.parametrize("local_rank, index", [(0, 0), (1, 1), (3, 3), (4, 0), (6, 2)])
def test_several_gpus_local_rank_modulo_count(local_rank, index):
    choice = choose_gpu(local_rank, FOUR, {})
    assert choice.visible_index == index
    assert choice.device_id == str(index)  # nothing narrows the GPUs: NVML index = CUDA index
    assert "modulo 4" in choice.reason


def test_device_id_maps_through_cuda_visible_devices():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert choose_gpu(1, FOUR, env).device_id == "5"


def test_device_id_keeps_uuids():
    env = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"}
    assert choose_gpu(3, ["GPU:0", "GPU:1"], env).device_id == "GPU-bbbb"


def test_device_id_from_slurm_step_gpus_when_cuda_unset():
    env = {"SLURM_STEP_GPUS": "2,3"}
    choice = choose_gpu(0, ["GPU:0", "GPU:1"], env)
    assert (choice.visible_index, choice.device_id) == (0, "2")


def test_device_id_falls_back_to_index_when_lists_disagree():
    # cgroup-constrained step: CUDA lists 2 devices, Slurm names 4 of the node's.
    env = {"SLURM_JOB_GPUS": "0,1,2,3"}
    assert choose_gpu(1, ["GPU:0", "GPU:1"], env).device_id == "1"


def test_unknown_local_rank_uses_environment():
    assert choose_gpu(None, FOUR, {"MPI_LOCALRANKID": "2"}).visible_index == 2


def test_unknown_local_rank_with_several_gpus_is_a_clear_error():
    with pytest.raises(UserError, match=r"4 GPUs are visible but this rank's node-local rank"):
        choose_gpu(None, FOUR, {})


def test_unknown_local_rank_with_one_gpu_is_fine():
    assert choose_gpu(None, ["GPU:0"], {}).visible_index == 0


@pytest.mark.parametrize("value, expected", [
    ("", []), ("NoDevFiles", []), ("0,1", ["0", "1"]), (" 3 , 1 ", ["3", "1"])])
def test_device_id_lists(value, expected):
    assert device_ids({"CUDA_VISIBLE_DEVICES": value}) == expected
    assert device_ids({}) is None


# --- world size ------------------------------------------------------------------------

def test_world_size_nothing_announced_passes():
    check_world_size(3, {})


def test_world_size_matching_launcher_passes():
    check_world_size(3, {"PMI_SIZE": "3", "OMPI_COMM_WORLD_SIZE": "3"})


@pytest.mark.parametrize("name", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"])
def test_world_size_launcher_mismatch(name):
    with pytest.raises(UserError) as caught:
        check_world_size(1, {name: "4"})
    message = str(caught.value)
    assert f"{name}=4" in message and "MPI reports 1" in message


def test_srun_without_pmix_separate_singletons_is_caught():
    # Open MPI under srun without PMIx: each task is its own 1-rank world.
    env = {"SLURM_STEP_NUM_TASKS": "5", "SLURM_NTASKS": "5", "SLURM_PROCID": "3"}
    with pytest.raises(UserError) as caught:
        check_world_size(1, env)
    message = str(caught.value)
    assert "SLURM_STEP_NUM_TASKS=5" in message and "1 rank(s)" in message
    assert "--mpi=pmix" in message


def test_singletons_caught_even_if_they_set_a_launcher_size():
    env = {"SLURM_STEP_NUM_TASKS": "4", "OMPI_COMM_WORLD_SIZE": "1"}
    with pytest.raises(UserError, match="SLURM_STEP_NUM_TASKS=4"):
        check_world_size(1, env)


def test_srun_task_ntasks_used_without_step_variable():
    with pytest.raises(UserError, match="SLURM_NTASKS=4"):
        check_world_size(2, {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"})


def test_batch_script_ntasks_alone_is_not_compared():
    # In the batch script (no srun task), SLURM_NTASKS is the allocation's count.
    check_world_size(3, {"SLURM_NTASKS": "8"})


def test_mpirun_inside_allocation_with_fewer_ranks_passes():
    # Ranks inherit the daemon step's variables; the launcher's own size is authoritative.
    env = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8", "PMI_SIZE": "3"}
    check_world_size(3, env)


def test_srun_matching_passes():
    check_world_size(5, {"SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "0", "PMI_SIZE": "5"})


def test_malformed_size_is_a_clear_error():
    with pytest.raises(UserError, match=r"PMI_SIZE should be a whole number, but it is 'four'"):
        check_world_size(4, {"PMI_SIZE": "four"})


# --- threads (unchanged behaviour) -----------------------------------------------------

def test_worker_threads():
    assert worker_threads(3, 16, 5, True) == 3
    assert worker_threads(0, 16, 5, True) == 4
    assert worker_threads(0, 2, 3, True) == 1
    assert worker_threads(0, 8, 2, False) == 4


# --- configure_tensorflow on a fake TensorFlow (no GPU here) ----------------------------

class FakeTf:
    """The part of tf.config that configure_tensorflow touches, recording the calls."""

    def __init__(self, gpus):
        self.calls = []
        fake = self

        class Threading:
            @staticmethod
            def set_intra_op_parallelism_threads(n):
                fake.calls.append(("intra", n))

            @staticmethod
            def set_inter_op_parallelism_threads(n):
                fake.calls.append(("inter", n))

        class Experimental:
            @staticmethod
            def set_memory_growth(gpu, on):
                fake.calls.append(("growth", gpu.name, on))

        class Config:
            threading = Threading
            experimental = Experimental

            @staticmethod
            def list_physical_devices(kind):
                assert kind == "GPU"
                return gpus

            @staticmethod
            def set_visible_devices(devices, kind):
                fake.calls.append(("visible", [d.name for d in devices], kind))

        self.config = Config


class FakeGpu:
    def __init__(self, name):
        self.name = name


@pytest.fixture
def fake_tf(monkeypatch):
    from pbkd_mpi.mpi import devices

    def install(count):
        tf = FakeTf([FakeGpu(f"/physical_device:GPU:{i}") for i in range(count)])
        monkeypatch.setattr(devices, "import_tensorflow", lambda: tf)
        return tf

    return install


def test_configure_pins_one_gpu_with_memory_growth(fake_tf):
    from pbkd_mpi.mpi.devices import configure_tensorflow, configure_tensorflow_choice

    tf = fake_tf(4)
    assert configure_tensorflow(3, 6, environ={}) == "/physical_device:GPU:2"
    assert tf.calls == [("intra", 3), ("inter", 2),
                        ("visible", ["/physical_device:GPU:2"], "GPU"),
                        ("growth", "/physical_device:GPU:2", True)]
    name, choice = configure_tensorflow_choice(1, 1, environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert (name, choice.device_id) == ("/physical_device:GPU:1", "5")


def test_configure_hides_gpus_from_a_rank_that_needs_none(fake_tf):
    from pbkd_mpi.mpi.devices import configure_tensorflow

    tf = fake_tf(2)
    assert configure_tensorflow(1, 0, use_gpu=False, environ={}) == "cpu"
    assert ("visible", [], "GPU") in tf.calls
    assert not any(call[0] == "growth" for call in tf.calls)


def test_configure_without_gpus_is_cpu(fake_tf):
    from pbkd_mpi.mpi.devices import configure_tensorflow

    tf = fake_tf(0)
    assert configure_tensorflow(2, 0, environ={}) == "cpu"
    assert tf.calls == [("intra", 2), ("inter", 2)]


def test_configure_tensorflow_for_real_in_a_fresh_process():
    # Thread pools can only be set before TensorFlow's runtime starts: a fresh process.
    import subprocess
    import sys

    code = ("from pbkd_mpi.mpi.devices import configure_tensorflow; import tensorflow as tf; "
            "print(configure_tensorflow(1, 0), "
            "tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    device, intra, inter = result.stdout.split()[-3:]
    assert (intra, inter) == ("1", "2")
    assert device == "cpu" or "GPU" in device


def test_rank_0_trains_only_on_a_gpu_no_worker_uses():
    from pbkd_mpi.mpi.devices import coordinator_trains

    # mpirun -np 4 on 4 GPUs: workers on GPUs 1-3, rank 0's GPU 0 would idle.
    assert coordinator_trains("auto", ("n1", "0"), [("n1", "1"), ("n1", "2"), ("n1", "3")])[0]
    # -np 5 on 4 GPUs: worker 4 shares GPU 0 (local rank 4 modulo 4).
    trains, why = coordinator_trains("auto", ("n1", "0"),
                                     [("n1", "1"), ("n1", "2"), ("n1", "3"), ("n1", "0")])
    assert not trains and "worker rank(s) [4]" in why
    # The same GPU id on another node is another GPU.
    assert coordinator_trains("auto", ("n1", "0"), [("n2", "0"), ("n2", "1")])[0]
    # Slurm binding one GPU per task: distinct ids, though each rank sees "its only GPU".
    assert coordinator_trains("auto", ("n1", "GPU-aa"), [("n1", "GPU-bb")])[0]
    assert not coordinator_trains("auto", ("n1", None), [("n1", None)])[0]  # CPU only
    assert coordinator_trains("yes", ("n1", None), [("n1", None)]) == (
        True, "tasks.coordinator_trains = yes")
    assert not coordinator_trains("no", ("n1", "0"), [("n1", "1")])[0]
