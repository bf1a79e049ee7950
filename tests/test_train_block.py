import keras
import numpy as np
import pytest

from pbkd_mpi.cache.build import build_cache
from pbkd_mpi.cache.layout import cache_fingerprint
from pbkd_mpi.config import DistillConfig
from pbkd_mpi.distill.checkpoint import load_state
from pbkd_mpi.distill.train_block import BlockTask, train_block
from pbkd_mpi.model.graph import boundaries, find_blocks
from pbkd_mpi.model.students import initial_weights
from pbkd_mpi.schedule.profiling import measure_block


@pytest.fixture(scope="module")
def make_task(tiny_teacher, tiny_dataset, tmp_path_factory):
    """Tasks of the tiny teacher's blocks, on one float32 cache built once."""
    blocks = find_blocks(tiny_teacher)
    names = boundaries(blocks)
    fingerprint = cache_fingerprint("t", tiny_dataset.fingerprint(), names, "float32")
    path = tmp_path_factory.mktemp("cache") / "c.h5"
    build_cache(tiny_teacher, tiny_dataset, names, path, fingerprint, "float32")

    def make(index, **config):
        block = blocks[index]
        return BlockTask(block, str(path), fingerprint, DistillConfig(**{"batch_size": 32, **config}),
                         seed=0, estimated_cost=1.0,
                         initial_weights=initial_weights(block, tiny_teacher))

    return make


def test_a_block_learns_its_teacher_block_and_is_reproducible(make_task):
    task = make_task(1, epochs=6)
    block = task.block
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


def test_a_stopped_task_resumes_from_its_last_epoch(make_task, tmp_path):
    task = make_task(3, epochs=4, patience=4)

    class StopAfterTwoEpochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("stopped")

    checkpoint = tmp_path / "task.progress.npz"
    with pytest.raises(KeyboardInterrupt):
        train_block(task, callbacks=[StopAfterTwoEpochs()], checkpoint_path=checkpoint)
    state = load_state(checkpoint)
    assert state.epoch == 1 and len(state.history["loss"]) == 2
    assert len(state.optimizer) > 1 and int(state.optimizer[0]) > 0  # Adam's step count

    resumed = train_block(task, checkpoint_path=checkpoint)
    assert resumed["resumed_from_epoch"] == 2
    assert resumed["epochs"] == 4 and resumed["history"]["loss"][:2] == state.history["loss"]
    whole = train_block(task)
    # Same data, same seed: within training noise of the uninterrupted task.
    assert resumed["val_mse"] == pytest.approx(whole["val_mse"], rel=0.25)
    assert resumed["initial_val_mse"] == whole["initial_val_mse"]


def test_a_finished_task_leaves_no_pairs_resident(make_task):
    """tf.data keeps every from_generator dataset's generator alive for the process, and a
    worker runs many tasks: each must drop its arrays when it ends, even when it fails."""
    import gc
    import weakref

    from pbkd_mpi.cache.reader import CacheStore

    def stores():
        gc.collect()
        return [obj for obj in gc.get_objects() if isinstance(obj, CacheStore)]

    # Other tests in this process may hold stores of their own: only new ones count.
    earlier = weakref.WeakSet(stores())

    def held_bytes():
        return sum(array.nbytes for store in stores() if store not in earlier
                   for pair in store._arrays.values() for array in pair)

    task = make_task(2, epochs=1)
    assert task.source.memory_budget_bytes > 0  # loaded into RAM, not streamed
    train_block(task)
    assert held_bytes() == 0

    class Fails(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train_block(task, callbacks=[Fails()])
    assert held_bytes() == 0


def test_profiling_a_split_of_fewer_batches_than_the_timed_steps(make_task, tiny_dataset):
    """240 training samples in batches of 128 are 2 batches, fewer than the 6 steps timed:
    they are taken again, so that every step is timed (a 224 px job on 64 images ran out
    of data here, took the median of no half steps and ended the run with NaN)."""
    import warnings

    task = make_task(1, batch_size=128)
    samples = {"train": len(tiny_dataset.y_train), "val": len(tiny_dataset.y_val),
               "item_bytes": 4}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry = measure_block(task, samples)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "ran out of data" in m or "empty slice" in m], messages
    timed = [value for key, value in entry.items()
             if isinstance(value, float) and key.endswith("_s")]
    assert timed and all(np.isfinite(value) and value >= 0 for value in timed)
    assert entry["seconds_per_step"] > 0


def test_channel_moments_accumulated_by_batches_equal_the_whole():
    from pbkd_mpi.distill.train_block import _channel_moments

    inputs = keras.Input((4, 4, 3))
    feature = keras.Model(inputs, keras.layers.Conv2D(5, 3, padding="same")(inputs))
    x = np.random.default_rng(0).normal(2.0, 3.0, (150, 4, 4, 3)).astype(np.float32)
    whole = feature.predict(x, verbose=0)
    mean, variance = _channel_moments(feature, x, batch_size=64)
    np.testing.assert_allclose(mean, whole.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, whole.var(axis=(0, 1, 2)), rtol=1e-4)
