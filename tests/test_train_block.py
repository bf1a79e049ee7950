import numpy as np

from pbkd_mpi.cache import build_cache, cache_fingerprint
from pbkd_mpi.config import DistillConfig
from pbkd_mpi.graph import boundaries, find_blocks
from pbkd_mpi.students import initial_weights
from pbkd_mpi.train_block import BlockTask, train_block


def test_a_block_learns_its_teacher_block_and_is_reproducible(tiny_teacher, tiny_dataset,
                                                               tmp_path):
    blocks = find_blocks(tiny_teacher)
    names = boundaries(blocks)
    fingerprint = cache_fingerprint("t", tiny_dataset.fingerprint(), names, "float32")
    path = tmp_path / "c.h5"
    build_cache(tiny_teacher, tiny_dataset, names, path, fingerprint, "float32")
    block = blocks[1]
    task = BlockTask(block, str(path), fingerprint, DistillConfig(epochs=6, batch_size=32),
                     seed=0, estimated_cost=1.0,
                     initial_weights=initial_weights(block, tiny_teacher))
    first = train_block(task)
    # Learned something: better than predicting the target's mean, and better than the
    # factorised teacher kernel it started from.
    assert first["val_mse"] < 0.5 * first["target_variance"]
    assert first["val_mse"] < first["initial_val_mse"]
    assert set(first["weights"]) == {"conv2_student_dw", "conv2_student_pw", "conv2_student_bn"}
    assert first["student_params"] < block.teacher_params
    second = train_block(task)
    for name, arrays in first["weights"].items():
        for a, b in zip(arrays, second["weights"][name]):
            np.testing.assert_array_equal(a, b)
