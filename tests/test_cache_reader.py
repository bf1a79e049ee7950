"""The cache reader: every sample once per epoch, views cycled, recompute equal to cache."""

import keras
import numpy as np
import pytest

from pbkd_mpi.cache.build import build_shards, stitch
from pbkd_mpi.cache.layout import CacheOptions, fingerprint_for
from pbkd_mpi.cache.reader import CachedPairs, CacheStore, RecomputedPairs, read_pair, window_plan
from pbkd_mpi.data.augment import AugmentSpec, Views
from pbkd_mpi.model.graph import MODEL_INPUT


NAMES = [MODEL_INPUT, "relu1", "pool1", "relu3"]
VIEWS = AugmentSpec(views=2)


@pytest.fixture(scope="module")
def cache(tiny_teacher, tiny_dataset, tmp_path_factory):
    """float32, two augmented views, built by two ranks."""
    path = tmp_path_factory.mktemp("reader") / "activations.h5"
    options = CacheOptions(dtype="float32", shard_samples=100, augment=VIEWS)
    fp = fingerprint_for("t", tiny_dataset, NAMES, options, "unit", seed=0)
    for rank in range(2):
        build_shards(tiny_teacher, tiny_dataset, NAMES, path, fp, options, rank, 2, seed=0)
    stitch(tiny_teacher, tiny_dataset, NAMES, path, fp, options)
    return path, fp


def _index_of_rows(images):
    return {row.tobytes(): i for i, row in enumerate(images)}


@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["streamed", "in-memory"])
def test_every_sample_comes_once_per_epoch_with_its_own_target(cache, budget):
    path, fp = cache
    parts = ["train", "train_v1", "train_v2"]
    store = CacheStore(path, fp, [*parts, "val"], MODEL_INPUT, "relu1",
                       memory_budget_bytes=budget)
    assert store.in_memory == bool(budget)
    store.unit_rows = 16  # several windows of several units even on 270 samples
    source = CachedPairs(store, parts, batch_size=32, seed=5, window_units=3)
    orders = []
    for epoch in range(4):
        part = parts[epoch % 3]
        images, targets = read_pair(path, fp, part, MODEL_INPUT, "relu1")
        where = _index_of_rows(images)
        batches = list(source.epoch_batches(epoch))  # as profiling and splitting read
        assert [len(x) for x, _ in batches] == [32] * 8 + [14]
        x, y = (np.concatenate(a) for a in zip(*source.next_epoch()))  # as Keras reads
        np.testing.assert_array_equal(x, np.concatenate([b[0] for b in batches]))
        seen = [where[row.tobytes()] for row in x]
        np.testing.assert_array_equal(y, targets[seen])
        assert sorted(seen) == list(range(270)), part
        orders.append(seen)
    assert source.epoch == 4
    assert orders[0] != sorted(orders[0]) and orders[0] != orders[3]  # shuffled, anew
    store.close()


@pytest.fixture(scope="module")
def cache16(tiny_teacher, tiny_dataset, tmp_path_factory):
    """float16 (the default), no views, one rank."""
    path = tmp_path_factory.mktemp("reader16") / "activations.h5"
    options = CacheOptions(shard_samples=100)
    fp = fingerprint_for("t16", tiny_dataset, NAMES, options, "unit", seed=0)
    build_shards(tiny_teacher, tiny_dataset, NAMES, path, fp, options, 0, 1, seed=0)
    stitch(tiny_teacher, tiny_dataset, NAMES, path, fp, options)
    return path, fp


@pytest.mark.parametrize("way", ["streamed", "in-memory"])
def test_the_dataset_gives_next_epochs_samples_in_full_float32_batches(cache16, way):
    path, fp = cache16
    twins = []
    for _ in range(2):  # one read through dataset(), one through next_epoch
        store = CacheStore(path, fp, ["train"], "pool1", "relu3", memory_budget_bytes=0)
        budget = {"streamed": 0, "in-memory": store.bytes}[way]
        store = CacheStore(path, fp, ["train"], "pool1", "relu3", memory_budget_bytes=budget)
        store.unit_rows = 16  # several windows of several units, the last one short
        twins.append(CachedPairs(store, ["train"], batch_size=32, seed=5, window_units=3))
    source, twin = twins
    assert source.store.in_memory == (way == "in-memory")
    images, targets = read_pair(path, fp, "train", "pool1", "relu3")
    where = _index_of_rows(images.astype(np.float32))
    data = source.dataset()
    for epoch in range(3):
        batches = list(data)
        assert [len(x) for x, _ in batches] == [32] * 8 + [14]
        assert all(x.dtype == y.dtype == "float32" for x, y in batches)
        x, y = (np.concatenate(a) for a in zip(*batches))
        expected = [np.concatenate(a).astype(np.float32) for a in zip(*twin.next_epoch())]
        np.testing.assert_array_equal(x, expected[0])
        np.testing.assert_array_equal(y, expected[1])
        seen = [where[row.tobytes()] for row in x]
        assert sorted(seen) == list(range(270)) and seen != sorted(seen)
        np.testing.assert_array_equal(y, targets[seen].astype(np.float32))
    assert source.epoch == 3
    for store in {source.store, twin.store}:
        store.close()


@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["streamed", "in-memory"])
def test_a_poisoned_dataset_has_a_nan_in_every_batch(cache16, budget):
    path, fp = cache16
    store = CacheStore(path, fp, ["train"], "pool1", "relu3", memory_budget_bytes=budget)
    for x, _ in CachedPairs(store, ["train"], batch_size=32, poison=True).dataset():
        assert np.isnan(x[0]).all() and not np.isnan(x[1:]).any()
    store.close()


@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["streamed", "in-memory"])
def test_the_dataset_runs_without_tf_data_autotuning(cache16, budget):
    """Autotuning's thread held up the end of every epoch until its next doubling wake-up
    (2.56, 5.12, 10.24 s after the epoch's start: docs/cache.md); it stays off."""
    path, fp = cache16
    store = CacheStore(path, fp, ["train"], "pool1", "relu3", memory_budget_bytes=budget)
    data = CachedPairs(store, ["train"], batch_size=32).dataset()
    assert data.options().autotune.enabled is False
    assert sum(len(x) for x, _ in data) == 270
    store.close()


def test_window_plan_covers_each_unit_once():
    plan = window_plan(100, 16, 3, np.random.default_rng(0))
    starts = sorted(piece.start for window in plan for piece in window)
    assert starts == list(range(0, 100, 16)) and [len(w) for w in plan] == [3, 3, 1]
    assert plan[-1][0].stop - plan[-1][0].start in (4, 16)


def test_keras_reads_one_view_per_epoch(cache):
    path, fp = cache
    store = CacheStore(path, fp, ["train", "train_v1", "train_v2", "val"], "pool1", "relu3")
    source = CachedPairs(store, ["train", "train_v1", "train_v2"], batch_size=64, seed=0)
    seen = []

    class Parts(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(source.epoch)

    inputs = keras.Input(store.shapes[0])
    model = keras.Model(inputs, keras.layers.Conv2D(16, 1)(inputs))
    model.compile("sgd", "mse")
    model.fit(source.dataset(), epochs=4, verbose=0, shuffle=False, callbacks=[Parts()])
    # The epoch counter moved on exactly once per epoch, so epoch e read view e mod 3.
    assert seen == [1, 2, 3, 4]


def test_recomputed_pairs_equal_the_cached_ones(cache, tiny_teacher, tiny_dataset):
    path, fp = cache
    views = Views(tiny_dataset.x_train, VIEWS, seed=0)
    images = {"train": tiny_dataset.x_train, "val": tiny_dataset.x_val}
    for part in ("train_v2", "val"):
        recomputed = RecomputedPairs(tiny_teacher, views, images, [part], "pool1", "relu3",
                                     batch_size=64, shuffle=False)
        x, y = (np.concatenate(a) for a in zip(*recomputed.epoch_batches(0)))
        x_cached, y_cached = read_pair(path, fp, part, "pool1", "relu3")
        np.testing.assert_allclose(x, x_cached, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, y_cached, rtol=1e-5, atol=1e-5)


def test_a_block_trains_in_recompute_mode(tiny_teacher, tiny_dataset, tmp_path):
    from pbkd_mpi.cache.reader import DataSource
    from pbkd_mpi.config import DataConfig, DistillConfig
    from pbkd_mpi.model.graph import find_blocks
    from pbkd_mpi.model.students import initial_weights
    from pbkd_mpi.keys import model_fingerprint
    from pbkd_mpi.distill.train_block import BlockTask, train_block

    teacher_file = tmp_path / "teacher.keras"
    tiny_teacher.save(teacher_file)
    block = find_blocks(tiny_teacher)[2]
    source = DataSource(mode="recompute", teacher_file=str(teacher_file),
                        teacher_fingerprint=model_fingerprint(tiny_teacher),
                        data=DataConfig(image_size=(16, 16), demo_train=300, demo_test=100),
                        data_fingerprint=tiny_dataset.fingerprint(), views=1,
                        augment=AugmentSpec(views=1))
    task = BlockTask(block, "", "recompute", DistillConfig(epochs=2, batch_size=32), seed=0,
                     estimated_cost=1.0, initial_weights=initial_weights(block, tiny_teacher),
                     source=source)
    result = train_block(task)
    assert result["epochs"] == 2 and np.isfinite(result["val_mse"])
    assert result["val_mse"] < result["target_variance"]


def test_leaving_a_prefetched_loop_early_ends_its_thread():
    """The producer has made every item and waits to hand over the end with the queue
    full; the consumer leaves. Closing must not wait forever for the producer."""
    import threading
    import time

    from pbkd_mpi.cache.reader import _prefetched

    items = _prefetched(lambda: iter(range(3)), depth=2)
    assert next(items) == 0
    time.sleep(0.3)  # 1 and 2 fill the queue; the end marker has no room
    closing = threading.Thread(target=items.close)
    closing.start()
    closing.join(timeout=5)
    assert not closing.is_alive()
