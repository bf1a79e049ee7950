import h5py
import keras
import numpy as np
import pytest

from pbkd_mpi.cache.build import build_cache
from pbkd_mpi.cache.layout import cache_fingerprint, is_complete
from pbkd_mpi.cache.reader import read_pair
from pbkd_mpi.errors import UserError
from pbkd_mpi.keys import model_fingerprint
from pbkd_mpi.model.graph import MODEL_INPUT, boundaries, find_blocks


@pytest.fixture()
def built_cache(tiny_teacher, tiny_dataset, tmp_path):
    names = boundaries(find_blocks(tiny_teacher))
    fingerprint = cache_fingerprint(model_fingerprint(tiny_teacher), tiny_dataset.fingerprint(),
                                    names, "float16")
    path = tmp_path / "cache.h5"
    info = build_cache(tiny_teacher, tiny_dataset, names, path, fingerprint, "float16",
                       batch_size=64)
    return path, fingerprint, names, info


def test_cached_activations_equal_the_teachers_within_fp16(built_cache, tiny_teacher,
                                                           tiny_dataset):
    path, fingerprint, names, info = built_cache
    assert info["reused"] is False and is_complete(path, fingerprint)
    probe = keras.Model(tiny_teacher.inputs, tiny_teacher.get_layer("relu3").output)
    expected = probe.predict(tiny_dataset.x_val, verbose=0)
    x, y = read_pair(path, fingerprint, "val", "pool1", "relu3")
    assert y.dtype == np.float16 and y.shape == expected.shape
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    x_in, _ = read_pair(path, fingerprint, "train", MODEL_INPUT, "relu1")
    np.testing.assert_allclose(x_in.astype(np.float32), tiny_dataset.x_train, atol=1e-3)


def test_a_complete_cache_is_reused(built_cache, tiny_teacher, tiny_dataset):
    path, fingerprint, names, _ = built_cache
    stamp = path.stat().st_mtime_ns
    info = build_cache(tiny_teacher, tiny_dataset, names, path, fingerprint, "float16")
    assert info["reused"] is True and path.stat().st_mtime_ns == stamp


def test_foreign_or_truncated_caches_are_never_used(built_cache, tiny_teacher, tiny_dataset):
    path, fingerprint, names, _ = built_cache
    assert not is_complete(path, "0" * 16)
    with pytest.raises(UserError, match="missing, incomplete or belongs to another run"):
        read_pair(path, "0" * 16, "val", "pool1", "relu3")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not is_complete(path, fingerprint)
    info = build_cache(tiny_teacher, tiny_dataset, names, path, fingerprint, "float16")
    assert info["reused"] is False and is_complete(path, fingerprint)


def test_an_unfinished_cache_is_not_complete(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.attrs["fingerprint"] = "abc"
        f.attrs["complete"] = False
    assert not is_complete(tmp_path / "c.h5", "abc")


def test_fingerprint_changes_with_weights_data_boundaries_and_dtype(tiny_teacher, tiny_dataset):
    base = dict(teacher_fingerprint="t", data_fingerprint="d", names=["a"], dtype="float16")
    reference = cache_fingerprint(**base)
    for key, value in [("teacher_fingerprint", "t2"), ("data_fingerprint", "d2"),
                       ("names", ["a", "b"]), ("dtype", "float32")]:
        assert cache_fingerprint(**{**base, key: value}) != reference
    before = model_fingerprint(tiny_teacher)
    layer = tiny_teacher.get_layer("conv1")
    original = layer.get_weights()
    layer.set_weights([w + 1e-3 for w in original])
    try:
        assert model_fingerprint(tiny_teacher) != before
    finally:
        layer.set_weights(original)


def test_size_estimate_matches_the_written_cache(built_cache, tiny_teacher, tiny_dataset):
    from pbkd_mpi.cache.layout import estimate_bytes

    path, _, names, info = built_cache
    samples = len(tiny_dataset.y_train) + len(tiny_dataset.y_val)
    sizes = estimate_bytes(tiny_teacher, names, samples, "float16")
    assert sizes["relu1"] == 16 * 16 * 8 * 2 * samples
    # The file holds the data plus HDF5's own bookkeeping, a little more.
    assert sum(sizes.values()) <= info["bytes"] < 1.05 * sum(sizes.values()) + 200_000


def test_not_enough_disk_is_refused_before_writing(tiny_teacher, tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from pbkd_mpi.cache import layout as cache

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: Usage(10**9, 0, 10**6))
    sizes = cache.estimate_bytes(tiny_teacher, ["relu1", "relu2"], 10_000, "float32")
    with pytest.raises(UserError, match=r"needs 163.8 MB \(2 boundaries x 10000 samples, "
                                        r"float32.*has 1.0 MB free.*float16\" halves it"):
        cache.check_disk(tmp_path / "run" / "sub", sizes, 10_000, "float32")
    cache.check_disk(tmp_path, {"relu1": 1000}, 1, "float16")  # fits: no error
