"""Each rank's memory budget and the early refusal of a job that cannot fit."""

import dataclasses

import numpy as np
import pytest

from pbkd_mpi import memory_budget
from pbkd_mpi.config import load_job
from pbkd_mpi.errors import UserError
from pbkd_mpi.model.cost import activation_bytes
from pbkd_mpi.model.graph import find_blocks


def test_node_memory_is_the_least_of_machine_cgroup_and_slurm(tmp_path):
    import psutil

    total = psutil.virtual_memory().total
    assert memory_budget.node_memory_bytes({}, cgroup_files=())[0] == total
    unlimited, limited = tmp_path / "v2", tmp_path / "v1"
    unlimited.write_text("max\n")
    limited.write_text(f"{4 << 30}\n")
    found = memory_budget.node_memory_bytes({}, cgroup_files=(unlimited, limited))
    assert found == (min(total, 4 << 30), f"the cgroup limit ({limited})") or total < 4 << 30
    slurm = memory_budget.node_memory_bytes({"SLURM_MEM_PER_NODE": "1000"},
                                            cgroup_files=(unlimited, limited))
    assert slurm == (1000 << 20, "Slurm's --mem")


def test_the_budget_shares_the_node_among_its_ranks_unless_set():
    node, _ = memory_budget.node_memory_bytes({"SLURM_MEM_PER_NODE": "8000"})
    assert memory_budget.rank_budget(0, 4, {"SLURM_MEM_PER_NODE": "8000"})[0] == node // 4
    assert memory_budget.rank_budget(1500, 4, {}) == (1500 << 20, "run.memory_budget_mb")


def test_the_estimate_counts_held_images_logits_and_one_blocks_pairs(tiny_teacher,
                                                                     tiny_dataset):
    job = load_job(None)
    blocks = find_blocks(tiny_teacher)
    early = memory_budget.estimate(job, tiny_dataset, None, 2, {})
    full = memory_budget.estimate(job, tiny_dataset, blocks, 2, {})
    # Train and validation are rows of one array, carved from it: counted once.
    arrays = {id(a): a.nbytes for a in (tiny_dataset.uncounted(n).source.array
                                        for n in ("x_train", "x_val", "x_test"))}
    assert tiny_dataset.x_train.source is tiny_dataset.x_val.source
    assert early.needs["images"] == sum(arrays.values()) > 0
    assert "teacher_logits" not in early.needs  # read from the cache a batch at a time
    recompute = load_job(None, ["cache.mode=recompute", "distill.chained_epochs=0"])
    assert memory_budget.estimate(recompute, tiny_dataset, None, 2, {}).needs[
        "teacher_logits"] == samples_of(tiny_dataset) * 10 * 4
    assert "block_pairs" not in early.needs
    samples = samples_of(tiny_dataset)
    largest = max(2 * samples * (int(b.input_shape[0] * b.input_shape[1] * b.input_shape[2])
                                 + int(b.output_shape[0] * b.output_shape[1]
                                       * b.output_shape[2])) for b in blocks)
    assert full.needs["block_pairs"] == largest
    assert "activations" not in full.needs  # no teacher given: nothing to count them from
    capped = dataclasses.replace(job, cache=dataclasses.replace(job.cache, memory_budget_mb=0))
    assert memory_budget.estimate(capped, tiny_dataset, blocks, 2, {}).needs["block_pairs"] == 0


def test_the_estimate_counts_one_fine_tuning_batchs_activations(tiny_teacher, tiny_dataset):
    """Every layer's float32 output per sample, times the batch: at 224 px the largest
    part (a ResNet50 cut after conv2_block2 keeps 54 MB a sample)."""
    per_sample = 4 * sum(int(np.prod(layer.output.shape[1:])) for layer in tiny_teacher.layers)
    assert activation_bytes(tiny_teacher) == per_sample
    blocks = find_blocks(tiny_teacher)
    job = load_job(None, ["finetune.batch_size=48"])
    plan = memory_budget.estimate(job, tiny_dataset, blocks, 2, {}, teacher=tiny_teacher)
    assert plan.needs["activations"] == 48 * per_sample
    frozen = load_job(None, ["finetune.epochs=0"])
    assert "activations" not in memory_budget.estimate(frozen, tiny_dataset, blocks, 2, {},
                                                       teacher=tiny_teacher).needs
    # 16x16 inputs keep 77 kB a sample; a batch of 20,000 samples (1.5 GB) does not fit 2 GB.
    huge = load_job(None, ["finetune.batch_size=20000", "run.memory_budget_mb=2000"])
    plan = memory_budget.estimate(huge, tiny_dataset, blocks, 2, {}, teacher=tiny_teacher)
    with pytest.raises(UserError, match=r"lower finetune.batch_size: one batch's activations "
                                        r"are [\d,]+ MB"):
        memory_budget.require_fits(plan, 2)


def samples_of(dataset) -> int:
    return len(dataset.y_train) + len(dataset.y_val)


def test_a_job_over_its_budget_is_refused_with_the_options(tiny_teacher, tiny_dataset):
    job = load_job(None, ["run.memory_budget_mb=100"])
    plan = memory_budget.estimate(job, tiny_dataset, find_blocks(tiny_teacher), 3, {})
    with pytest.raises(UserError) as refused:
        memory_budget.require_fits(plan, 3)
    message = str(refused.value)
    assert "budget is 100 MB (run.memory_budget_mb)" in message
    assert "runtime 620 MB" in message and "run fewer ranks on each node (now 3)" in message
    assert "lower cache.memory_budget_mb" in message
    fits = memory_budget.estimate(load_job(None, ["run.memory_budget_mb=4000"]), tiny_dataset,
                                  find_blocks(tiny_teacher), 3, {})
    memory_budget.require_fits(fits, 3)


def test_the_watch_warns_once_per_phase_while_the_phase_runs():
    import threading

    from pbkd_mpi.output.memory import MemoryWatch

    rss = {"bytes": 500 << 20}
    warnings, warned = [], threading.Event()

    def warn(message):
        warnings.append(message)
        warned.set()

    watch = MemoryWatch(1000 << 20, warn, interval_s=0.01, rss=lambda: rss["bytes"])
    try:
        watch.phase = "distill"
        assert not watch.check()  # 50%: quiet
        rss["bytes"] = 950 << 20
        assert warned.wait(5), "the watch's thread never looked"
        assert warnings == ["resident memory 950 MB in the distill phase is 95% of this "
                            "rank's budget (1,000 MB); past it the node may swap"]
        watch.close()  # the rest checks by hand, with no thread beside it
        assert not watch.check()  # once per phase
        watch.phase = "finetune"
        assert watch.check() and "finetune phase" in warnings[-1]
    finally:
        watch.close()


def test_forward_batches_shrink_where_one_sample_holds_much(tiny_teacher):
    """A forward pass holds every layer's output of its batch: 256 samples of 16 px take
    20 MB, 256 of 224 px through two 64-channel convs would take 6.4 GB."""
    import keras

    from pbkd_mpi.model.evaluate import FORWARD_BYTES, forward_batch

    assert forward_batch(tiny_teacher) == 256
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(64, 3, padding="same")(inputs)
    wide = keras.Model(inputs, keras.layers.Conv2D(64, 3, padding="same")(x))
    per_sample = 4 * 224 * 224 * (3 + 64 + 64)
    assert activation_bytes(wide) == per_sample
    assert forward_batch(wide) == FORWARD_BYTES // per_sample == 10
