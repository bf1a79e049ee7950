"""Sharded cache builds: stitching, fp16 error, fingerprints, resume and repair, disk refusal."""

import json
import shutil
from collections import namedtuple

import h5py
import keras
import numpy as np
import pytest

from pbkd_mpi.cache.build import build_shards, stitch
from pbkd_mpi.cache.layout import (CacheOptions, cache_fingerprint, check_disk, estimate_bytes,
                                   fingerprint_for, incomplete_reason, is_complete, part_counts,
                                   plan_shards, shard_dir)
from pbkd_mpi.cache.reader import read_pair
from pbkd_mpi.data.augment import AugmentSpec, Views
from pbkd_mpi.errors import UserError
from pbkd_mpi.keys import model_fingerprint
from pbkd_mpi.model.graph import MODEL_INPUT, boundaries, find_blocks


SHARD = 64  # the tiny set's 270 training samples make 5 shards, the last one partial


def _build(teacher, dataset, path, options, ranks=1, seed=0):
    names = boundaries(find_blocks(teacher))
    fp = fingerprint_for(model_fingerprint(teacher), dataset, names, options, "unit", seed)
    done = [build_shards(teacher, dataset, names, path, fp, options, rank, ranks, seed)
            for rank in range(ranks)]
    stitch(teacher, dataset, names, path, fp, options)
    return names, fp, done


@pytest.fixture(scope="module")
def caches(tiny_teacher, tiny_dataset, tmp_path_factory):
    """The same cache built by 1 rank and by 3 ranks (float16), and by 1 rank in float32."""
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for key, ranks, dtype in (("one", 1, "float16"), ("three", 3, "float16"),
                              ("fp32", 1, "float32")):
        path = root / key / "activations.h5"
        options = CacheOptions(dtype=dtype, shard_samples=SHARD)
        names, fp, done = _build(tiny_teacher, tiny_dataset, path, options, ranks)
        out[key] = (path, fp, names, done)
    return out


def test_shards_from_any_rank_count_stitch_to_what_the_teacher_computes(caches, tiny_teacher,
                                                                        tiny_dataset):
    path_one, fp_one, names, done_one = caches["one"]
    path_three, fp_three, _, done_three = caches["three"]
    assert fp_one == fp_three and is_complete(path_three, fp_three)
    # Round-robin: 5 train + 1 val shards over 3 ranks, 2 each; over 1 rank, all 6.
    assert [d["built"] for d in done_three] == [2, 2, 2] and done_one[0]["built"] == 6
    with h5py.File(path_one, "r") as one, h5py.File(path_three, "r") as three:
        for part in ("train", "val"):
            for name in names:
                assert one[part][name].is_virtual
                np.testing.assert_array_equal(one[part][name][()], three[part][name][()])
    # Equal to one writer computing the whole split at once (the float32 cache, exactly
    # up to the order of float additions in differently sized batches).
    path32, fp32, _, _ = caches["fp32"]
    probe = keras.Model(tiny_teacher.inputs, tiny_teacher.get_layer("relu3").output)
    for split in ("train", "val"):
        x = getattr(tiny_dataset, f"x_{split}")
        inputs, targets = read_pair(path32, fp32, split, MODEL_INPUT, "relu3")
        np.testing.assert_array_equal(inputs, x)
        np.testing.assert_allclose(targets, probe.predict(x, batch_size=len(x), verbose=0),
                                   rtol=1e-5, atol=1e-5)


def test_float16_values_are_within_half_a_unit_in_the_last_place(caches):
    path16, fp16, names, _ = caches["one"]
    path32, fp32, _, _ = caches["fp32"]
    for name in names:
        half, full = (read_pair(p, f, "train", name, name)[0] for p, f in
                      ((path16, fp16), (path32, fp32)))
        error = np.abs(half.astype(np.float32) - full)
        # fp16 keeps 11 significant bits: rounding is off by at most 2**-11 of the value;
        # below the smallest normal (6.1e-5) the spacing is 2**-24, half of it 2**-25.
        bound = np.maximum(np.abs(full) * 2.0**-11, 2.0**-25)
        assert (error <= bound).all(), (name, float((error - bound).max()))


def test_fingerprint_changes_with_weights_data_preprocessing_views_and_storage():
    base = dict(teacher_fingerprint="t", data_fingerprint="d", names=["a"], dtype="float16",
                compression="none", preprocessing="unit", augment=AugmentSpec(), seed=0)
    reference = cache_fingerprint(**base)
    changes = [("teacher_fingerprint", "t2"), ("data_fingerprint", "d2"),
               ("preprocessing", "symmetric"), ("augment", AugmentSpec(views=2)),
               ("names", ["a", "b"]), ("dtype", "float32"), ("compression", "lzf")]
    for key, value in changes:
        assert cache_fingerprint(**{**base, key: value}) != reference, key
    with_views = {**base, "augment": AugmentSpec(views=1)}
    assert cache_fingerprint(**with_views) != cache_fingerprint(**{**with_views, "seed": 1})
    assert cache_fingerprint(**{**base, "augment": AugmentSpec(views=1, crop=2)}) != \
        cache_fingerprint(**with_views)


def test_views_are_the_same_pixels_for_any_slice_and_differ_from_the_plain_set(tiny_dataset):
    spec = AugmentSpec(views=2)
    views = Views(tiny_dataset.x_train, spec, seed=3)
    whole = views.images(1, slice(None))
    np.testing.assert_array_equal(views.images(1, slice(64, 128)), whole[64:128])
    np.testing.assert_array_equal(views.images(1, np.array([5, 70])), whole[[5, 70]])
    assert whole.shape == tiny_dataset.x_train.shape
    assert not np.allclose(whole, tiny_dataset.x_train)
    assert not np.allclose(whole, views.images(2, slice(None)))
    again = Views(tiny_dataset.x_train, spec, seed=3).images(1, slice(None))
    np.testing.assert_array_equal(again, whole)


def test_complete_shards_are_kept_and_broken_ones_rebuilt(caches, tiny_teacher, tiny_dataset,
                                                          tmp_path):
    source, fp, names, _ = caches["one"]
    path = tmp_path / "activations.h5"
    shutil.copytree(shard_dir(source), shard_dir(path))
    shutil.copy(source, path)
    folder = shard_dir(path)
    assert is_complete(path, fp)
    # A truncated shard, a foreign one, one with a flipped byte in its data, one missing,
    # and the half-written temporary file a killed build leaves.
    truncated = (folder / "train-00000.h5").read_bytes()
    (folder / "train-00000.h5").write_bytes(truncated[: len(truncated) // 2])
    with h5py.File(folder / "train-00001.h5", "r+") as f:
        f.attrs["fingerprint"] = "0" * 16
    corrupt = folder / "train-00002.h5"
    with h5py.File(corrupt, "r") as f:
        offset = f["relu1"].id.get_chunk_info(0).byte_offset
    data = bytearray(corrupt.read_bytes())
    data[offset + 10] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (folder / "val-00000.h5").unlink()
    with h5py.File(path, "r") as f:  # what HDF5 itself would hand a reader
        assert np.isnan(f["val"]["relu1"][()]).all()
    (folder / ".train-00003.tmp999.h5").write_bytes(b"half a shard")

    # The stitched file would read a missing shard as fill values: it is not complete.
    assert "is missing or unreadable" in incomplete_reason(path, fp)
    heard = []
    options = CacheOptions(shard_samples=SHARD)
    done = build_shards(tiny_teacher, tiny_dataset, names, path, fp, options, log=heard.append)
    assert (done["built"], done["reused"]) == (4, 2)
    assert any("train-00002.h5" in line and "cannot be read" in line for line in heard)
    assert any("train-00001.h5" in line and "fingerprint" in line for line in heard)
    assert not list(folder.glob(".*tmp*"))
    stitch(tiny_teacher, tiny_dataset, names, path, fp, options)
    for name in names:
        np.testing.assert_array_equal(read_pair(path, fp, "train", name, name)[0],
                                      read_pair(source, fp, "train", name, name)[0])


def test_a_foreign_or_truncated_stitched_file_is_refused(caches, tmp_path):
    source, fp, _, _ = caches["one"]
    assert "fingerprint" in incomplete_reason(source, "0" * 16)
    path = tmp_path / "activations.h5"
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert "cannot be read" in incomplete_reason(path, fp)
    with pytest.raises(UserError, match="missing, incomplete or belongs to another run"):
        read_pair(path, fp, "val", MODEL_INPUT, "relu1")


def test_shard_boundaries_do_not_depend_on_the_rank_count(tiny_dataset):
    counts = part_counts(tiny_dataset, views=2)
    assert counts == {"train": 270, "val": 30, "train_v1": 270, "train_v2": 270}
    shards = plan_shards(counts, 100)
    assert [(s.part, s.start, s.stop) for s in shards[:4]] == [
        ("train", 0, 100), ("train", 100, 200), ("train", 200, 270), ("val", 0, 30)]
    assert sum(s.samples for s in shards) == sum(counts.values())


def _fake_disk(monkeypatch, free):
    import shutil as shutil_module

    usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**12, 0, free))


def test_the_disk_check_refuses_and_auto_mode_recomputes_instead(tiny_teacher, tiny_dataset,
                                                                 tmp_path, monkeypatch):
    from pbkd_mpi.cache.stage import prepare_cache
    from pbkd_mpi.config import CacheConfig, Job

    _fake_disk(monkeypatch, 10**5)
    sizes = estimate_bytes(tiny_teacher, ["relu1"], 1000, "float16")
    with pytest.raises(UserError, match=r"fewer augmented views \(cache.views = 2 now\).*"
                                        r"cache.mode = \"recompute\""):
        check_disk(tmp_path, sizes, 1000, "float16", views=2)
    check_disk(tmp_path, sizes, 1000, "float16", present=sum(sizes.values()))  # all kept

    class Log(list):
        def __call__(self, message):
            self.append(message)

        detail = __call__

    names = boundaries(find_blocks(tiny_teacher))
    for mode in ("cache", "auto"):
        job = Job(cache=CacheConfig(mode=mode))
        log = Log()
        if mode == "cache":
            with pytest.raises(UserError, match="The activation cache needs"):
                prepare_cache(job, tiny_teacher, "t", "teacher.keras", tiny_dataset, names,
                              tmp_path, None, log)
            assert not (tmp_path / "cache").exists()
            assert any("total:" in line and "float16" in line for line in log)
        else:
            stage = prepare_cache(job, tiny_teacher, "t", "teacher.keras", tiny_dataset,
                                  names, tmp_path, None, log)
            assert stage.source.mode == "recompute" and stage.info["mode"] == "recompute"
            assert stage.source.teacher_file == "teacher.keras"
            assert any("recompute mode instead" in line for line in log)


def test_compressed_caches_hold_the_same_values(tiny_teacher, tiny_dataset, caches, tmp_path):
    source, fp_plain, names, _ = caches["one"]
    for compression in ("lzf", "gzip"):
        options = CacheOptions(compression=compression, shard_samples=SHARD)
        path = tmp_path / compression / "activations.h5"
        _, fp, _ = _build(tiny_teacher, tiny_dataset, path, options)
        with h5py.File(shard_dir(path) / "train-00000.h5", "r") as f:
            assert f["relu1"].compression == compression and f["relu1"].fletcher32
            assert json.loads(f.attrs["boundaries"]) == list(names)
        for name in ("relu1", "relu3"):
            np.testing.assert_array_equal(read_pair(path, fp, "val", name, name)[0],
                                          read_pair(source, fp_plain, "val", name, name)[0])
