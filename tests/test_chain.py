"""The chained pass (chain.py): blocks retrained on the assembled student's own inputs."""

import dataclasses
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pbkd_mpi.cache.build import build_cache
from pbkd_mpi.cache.layout import cache_fingerprint
from pbkd_mpi.cache.reader import CacheStore
from pbkd_mpi.config import CacheConfig, DistillConfig, Job, validate_job
from pbkd_mpi.distill.chain import chain_blocks
from pbkd_mpi.distill.train_block import BlockTask, train_block
from pbkd_mpi.errors import UserError
from pbkd_mpi.keys import task_key, student_blocks_key
from pbkd_mpi.model.assemble import assemble_student
from pbkd_mpi.model.graph import boundaries, find_blocks
from pbkd_mpi.model.students import initial_weights


CHAINED_EPOCHS = 4


@pytest.fixture(scope="module")
def setup(tiny_teacher, tiny_dataset, tmp_path_factory):
    """The tiny teacher's blocks, a float32 cache, and each block trained briefly alone
    (the parallel phase, in this process)."""
    blocks = find_blocks(tiny_teacher)
    names = boundaries(blocks)
    fingerprint = cache_fingerprint("t", tiny_dataset.fingerprint(), names, "float32")
    path = tmp_path_factory.mktemp("cache") / "c.h5"
    build_cache(tiny_teacher, tiny_dataset, names, path, fingerprint, "float32")
    config = DistillConfig(epochs=2, batch_size=32)
    tasks = {block.name: BlockTask(block, str(path), fingerprint, config, seed=0,
                                   estimated_cost=1.0,
                                   initial_weights=initial_weights(block, tiny_teacher))
             for block in blocks}
    trained = {name: train_block(task)["weights"] for name, task in tasks.items()}
    return blocks, tasks, trained, path, fingerprint


def output_error(teacher, blocks, weights, dataset):
    """MSE between the assembled student's and the teacher's last block outputs (val)."""
    last = blocks[-1].output_boundary
    tensors = {}
    student = assemble_student(teacher, blocks, weights, 1, tensors)
    from pbkd_mpi.model.evaluate import recalibrate_batchnorm

    recalibrate_batchnorm(student, dataset.x_train)
    ours = keras.Model(student.inputs, tensors[last]).predict(dataset.x_val, verbose=0)
    theirs = keras.Model(teacher.inputs, teacher.get_layer(last).output).predict(
        dataset.x_val, verbose=0)
    return float(np.mean((ours - theirs) ** 2))


@pytest.mark.parametrize("order", ["parallel", "sequential"])
def test_the_chained_pass_lowers_each_blocks_error_on_the_students_input(
        setup, tiny_teacher, tiny_dataset, tmp_path, order):
    blocks, tasks, trained, _, _ = setup
    job = Job(distill=DistillConfig(batch_size=32, chained_epochs=CHAINED_EPOCHS,
                                    chained_order=order),
              cache=CacheConfig(dtype="float32"))
    calls, messages = [], []

    def run_tasks(todo):
        for task in todo.values():
            # The task reads the student's inputs from its file, and targets from the cache.
            assert Path(task.input_path).exists() and task.input_digest
            assert task.config.epochs == CHAINED_EPOCHS and task.source.views == 0
            assert (task.head_loss is not None) == (task.block is blocks[-1])
        calls.append(list(todo))
        return {name: train_block(task) for name, task in todo.items()}

    chained, report = chain_blocks(tiny_teacher, blocks, trained, {b.name: 1 for b in blocks},
                                   tasks, job, tiny_dataset, tmp_path, run_tasks,
                                   messages.append)
    rows = {row["name"]: row for row in report["blocks"]}
    assert report["order"] == order and report["input_seconds"] > 0
    # The first block reads the image, which is the teacher's own input: nothing to chain.
    assert rows[blocks[0].name]["skipped"]
    # Parallel: every other block but the last handed out at once, on inputs of the
    # unchained students, then the last; sequential: one at a time, each on the chained
    # ones before it.
    names = [b.name for b in blocks[1:]]
    assert calls == ([names[:-1], names[-1:]] if order == "parallel" else
                     [[name] for name in names])
    for block in blocks[1:]:
        row = rows[block.name]
        assert row["input_bytes"] > 0 and row["epochs"] >= 1 and row["seconds"] > 0
        # On its own (student) input, the trained block was worse than it can be: the pass
        # lowers its validation loss there, and keeps the new weights only then.
        if block is blocks[-1]:  # the last one's loss adds distillation through the head
            assert row["head_weight"] == job.distill.head_weight == 1.0
            assert row["val_loss"] > row["val_mse"] and row["val_loss_before"] > \
                row["val_mse_before"]
            # and it is judged by the assembled student's validation accuracy
            assert row["kept"] == (row["val_accuracy"] > row["val_accuracy_before"])
            assert 0 < row["val_accuracy_before"] <= 1 and 0 < row["val_accuracy"] <= 1
        else:  # the others' loss is the MSE, and they are judged by it
            assert row["head_weight"] == 0.0 and "val_accuracy" not in row
            assert row["val_loss"] == pytest.approx(row["val_mse"], rel=1e-5)
            assert row["kept"] == (row["val_loss"] < row["val_loss_before"])
    assert sum(rows[b.name]["kept"] for b in blocks[1:]) >= 2
    if order == "parallel":  # one file held the inputs of every block but the last
        assert report["input_bytes_max"] >= sum(rows[n]["input_bytes"] for n in names[:-1])
        assert [n for n in names if rows[n].get("parallel")] == names[:-1]
        assert report["parallel_s"] >= max(rows[n]["seconds"] for n in names[:-1])
    else:
        assert report["input_bytes_max"] == max(rows[n]["input_bytes"] for n in names)
        assert report["parallel_s"] == 0.0 and not any(r.get("parallel") for r in rows.values())
    for block in blocks[1:]:
        if rows[block.name]["kept"]:
            assert not all(np.array_equal(a, b) for a, b in zip(
                chained[block.name][f"{block.name}_student_pw"],
                trained[block.name][f"{block.name}_student_pw"]))
    assert list((tmp_path / "chain").glob("*.h5")) == []  # inputs deleted when done
    # The point of it all: the stitched student's last activation is closer to the teacher's.
    assert output_error(tiny_teacher, blocks, chained, tiny_dataset) < \
        output_error(tiny_teacher, blocks, trained, tiny_dataset)


def test_a_failed_chained_block_keeps_its_weights(setup, tiny_teacher, tiny_dataset,
                                                  tmp_path):
    blocks, tasks, trained, _, _ = setup
    job = Job(distill=DistillConfig(batch_size=32, chained_epochs=1),
              cache=CacheConfig(dtype="float32"))

    def run_tasks(todo):  # the second block failed on every attempt: no result
        return {name: train_block(task) for name, task in todo.items()
                if name != blocks[1].name}

    chained, report = chain_blocks(tiny_teacher, blocks, trained, {b.name: 1 for b in blocks},
                                   tasks, job, tiny_dataset, tmp_path, run_tasks,
                                   lambda _: None)
    row = report["blocks"][1]
    assert row["failed"] and "kept" not in row
    assert chained[blocks[1].name] is trained[blocks[1].name]
    from pbkd_mpi.output.report import _chained_lines

    assert any("failed on every attempt" in line for line in _chained_lines(report))


@pytest.mark.parametrize("order", ["parallel", "sequential"])
def test_a_resumed_chained_pass_reuses_its_saved_results(setup, tiny_teacher, tiny_dataset,
                                                          tmp_path, order):
    from pbkd_mpi.distill.results import result_path, save_result

    blocks, tasks, trained, _, _ = setup
    blocks, trained = blocks[:2], {b.name: trained[b.name] for b in blocks[:2]}
    job = Job(distill=DistillConfig(batch_size=32, chained_epochs=1, chained_order=order),
              cache=CacheConfig(dtype="float32"))
    calls = []

    def run_tasks(todo):
        calls.extend(todo)
        results = {name: train_block(task) for name, task in todo.items()}
        for name, task in todo.items():
            save_result(result_path(tmp_path, task), results[name], {})
        return results

    first, _ = chain_blocks(tiny_teacher, blocks, trained, {b.name: 1 for b in blocks}, tasks,
                            job, tiny_dataset, tmp_path, run_tasks, lambda _: None)
    second, report = chain_blocks(tiny_teacher, blocks, trained, {b.name: 1 for b in blocks},
                                  tasks, job, tiny_dataset, tmp_path, run_tasks, lambda _: None)
    assert calls == [blocks[1].name]  # the second pass trained nothing
    assert report["blocks"][1]["reused"] and report["input_seconds"] == 0.0
    for layer, arrays in first[blocks[1].name].items():
        for a, b in zip(arrays, second[blocks[1].name][layer]):
            np.testing.assert_array_equal(a, b)


def test_task_keys_follow_the_chained_setting(setup):
    _, tasks, trained, _, _ = setup
    task = tasks["conv2"]
    # A parallel task does not depend on chained_epochs: runs differing only there share it.
    assert task_key(task) == task_key(dataclasses.replace(
        task, config=dataclasses.replace(task.config, chained_epochs=3)))
    digest = student_blocks_key(trained, {name: 1 for name in trained})
    chained = dataclasses.replace(task, input_path="x.h5", input_digest=digest)
    assert task_key(chained) != task_key(task)
    # Other chained epochs, or inputs from other weights: another result.
    assert task_key(chained) != task_key(dataclasses.replace(
        chained, config=dataclasses.replace(task.config, epochs=task.config.epochs + 1)))
    # With the head's distillation, or another weight of it: another result; a parallel
    # task does not depend on the weight.
    from pbkd_mpi.distill.head_loss import HeadLoss

    def head(weight):
        return HeadLoss("{}", (), None, None, weight, 4.0)

    assert len({task_key(chained), task_key(dataclasses.replace(chained, head_loss=head(1.0))),
                task_key(dataclasses.replace(chained, head_loss=head(2.0)))}) == 3
    assert task_key(task) == task_key(dataclasses.replace(
        task, config=dataclasses.replace(task.config, head_weight=0.0)))
    other = {**trained, "conv1": {k: [a + 1 for a in v] for k, v in trained["conv1"].items()}}
    assert student_blocks_key(other, {n: 1 for n in other}) != digest
    assert student_blocks_key(trained, {**{n: 1 for n in trained}, "conv1": 2}) != digest


def test_a_cache_store_reads_inputs_from_another_file(setup, tmp_path):
    blocks, _, _, path, fingerprint = setup
    block = blocks[1]
    with h5py.File(path, "r") as f:
        x = {part: f[part][block.input_boundary][()] for part in ("train", "val")}
        y = f["train"][block.output_boundary][()]
    inputs = tmp_path / "inputs.h5"
    with h5py.File(inputs, "w") as f:
        f.attrs["fingerprint"] = "abc"
        for part, values in x.items():
            f.create_group(part).create_dataset(block.input_boundary, data=values * 2 + 1)
    store = CacheStore(path, fingerprint, ["train", "val"], block.input_boundary,
                       block.output_boundary, input_path=str(inputs), input_fingerprint="abc")
    got_x, got_y = store.arrays("train")
    np.testing.assert_array_equal(got_x, x["train"] * 2 + 1)
    np.testing.assert_array_equal(got_y, y)
    streamed = CacheStore(path, fingerprint, ["train", "val"], block.input_boundary,
                          block.output_boundary, memory_budget_bytes=0,
                          input_path=str(inputs), input_fingerprint="abc")
    sx, sy = streamed.datasets("val")
    np.testing.assert_array_equal(sx[:5], x["val"][:5] * 2 + 1)
    streamed.close()
    with pytest.raises(UserError, match="fingerprint"):
        CacheStore(path, fingerprint, ["train", "val"], block.input_boundary,
                   block.output_boundary, input_path=str(inputs), input_fingerprint="other")


def test_chained_epochs_need_the_cache():
    validate_job(Job(distill=DistillConfig(chained_epochs=2)))
    with pytest.raises(UserError, match="chained_epochs"):
        validate_job(Job(distill=DistillConfig(chained_epochs=2),
                         cache=CacheConfig(mode="recompute")))
