import dataclasses

import numpy as np

from pbkd_mpi.config import DistillConfig
from pbkd_mpi.distill.results import load_result, result_path, save_result
from pbkd_mpi.distill.train_block import BlockTask
from pbkd_mpi.keys import task_key
from pbkd_mpi.model.graph import find_blocks


def _task(block, **changes):
    task = BlockTask(block, "c.h5", "fp", DistillConfig(), seed=0, estimated_cost=1.0)
    return dataclasses.replace(task, **changes)


def test_saved_result_loads_back_whole(tiny_teacher, tmp_path):
    block = find_blocks(tiny_teacher)[0]
    weights = {"conv1_student_dw": [np.ones((3, 3, 3, 2), np.float32)],
               "conv1_student_bn": [np.full(8, float(i), np.float32) for i in range(12)]}
    result = {"weights": weights, "val_mse": 0.5, "history": {"loss": [1.0, 0.5]}}
    path = result_path(tmp_path, _task(block))
    save_result(path, result, {"rank": 2, "seconds": 3.5})
    loaded, info = load_result(path)
    assert info == {"rank": 2, "seconds": 3.5}
    assert loaded["val_mse"] == 0.5 and loaded["history"] == {"loss": [1.0, 0.5]}
    assert list(loaded["weights"]) == sorted(weights)
    for layer, arrays in weights.items():
        assert len(loaded["weights"][layer]) == len(arrays)  # order kept past index 9
        for got, want in zip(loaded["weights"][layer], arrays):
            np.testing.assert_array_equal(got, want)
    assert not list(tmp_path.glob("blocks/.*"))  # no temporary file left behind


def test_truncated_or_missing_results_are_not_reused(tiny_teacher, tmp_path):
    block = find_blocks(tiny_teacher)[0]
    path = result_path(tmp_path, _task(block))
    assert load_result(path) is None
    save_result(path, {"weights": {"a": [np.zeros(4)]}}, {"rank": 1, "seconds": 1.0})
    path.write_bytes(path.read_bytes()[:50])
    assert load_result(path) is None


def test_task_key_changes_with_what_the_result_depends_on(tiny_teacher):
    block, other = find_blocks(tiny_teacher)[:2]
    base = _task(block)
    keys = {task_key(base), task_key(_task(other)),
            task_key(_task(block, cache_fingerprint="other")),
            task_key(_task(block, config=DistillConfig(epochs=1))),
            task_key(_task(block, depth_multiplier=3)),
            task_key(_task(block, seed=5))}
    assert len(keys) == 6
    assert task_key(base) == task_key(_task(block, estimated_cost=99.0))
