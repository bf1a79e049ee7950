import pickle

import h5py
import numpy as np
import pytest
from PIL import Image

from pbkd_mpi.config import DataConfig
from pbkd_mpi.data.dataset import load_checked, load_dataset, portable_index, receive_index
from pbkd_mpi.data.demo import CLASS_NAMES, make_shapes
from pbkd_mpi.data.images import SCALES
from pbkd_mpi.errors import UserError


def test_demo_images_are_deterministic_balanced_and_varied():
    x1, y1 = make_shapes(200, (16, 16), seed=3)
    x2, y2 = make_shapes(200, (16, 16), seed=3)
    x3, _ = make_shapes(200, (16, 16), seed=4)
    assert x1.shape == (200, 16, 16, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert np.bincount(y1, minlength=len(CLASS_NAMES)).tolist() == [20] * len(CLASS_NAMES)
    # Not a constant picture per class: images of one class differ from each other.
    same_class = x1[y1 == 0].astype(np.float32)
    assert same_class.std(axis=0).mean() > 20


def test_splits_are_disjoint_and_fixed_by_the_seed(tiny_dataset):
    again = load_dataset(DataConfig(image_size=(16, 16), demo_train=300, demo_test=100), seed=0)
    assert tiny_dataset.fingerprint() == again.fingerprint()
    assert len(tiny_dataset.y_val) == 30 and len(tiny_dataset.y_train) == 270
    train = {x.tobytes() for x in tiny_dataset.x_train}
    assert not any(x.tobytes() in train for x in tiny_dataset.x_val)
    other = load_dataset(DataConfig(image_size=(16, 16), demo_train=300, demo_test=100), seed=1)
    assert other.fingerprint() != tiny_dataset.fingerprint()


def test_scales(tiny_dataset):
    x = np.asarray(tiny_dataset.x_train)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    symmetric = load_dataset(DataConfig(image_size=(16, 16), demo_train=100, demo_test=100,
                                        scale="symmetric"), seed=0)
    x = np.asarray(symmetric.x_train)
    assert x.min() < -0.5 and x.max() <= 1.0


@pytest.mark.parametrize("mode", ["caffe", "torch", "tf"])
def test_keras_applications_scales_match_preprocess_input(mode):
    from keras.applications import imagenet_utils

    x = np.random.default_rng(0).integers(0, 256, (5, 7, 6, 3)).astype(np.uint8)
    expected = imagenet_utils.preprocess_input(x.astype(np.float32), mode=mode)
    np.testing.assert_allclose(SCALES[mode](x), np.asarray(expected), rtol=1e-6, atol=1e-5)


def _arrays(size=(12, 12), n=40, classes=4):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, *size, 3), dtype=np.uint8)
    y = np.arange(n) % classes
    return x, y


def test_npz_with_and_without_validation(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    data = load_dataset(DataConfig(source=str(tmp_path / "d.npz"), image_size=(12, 12)), seed=0)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (36, 4, 10)
    assert data.num_classes == 4
    np.savez(tmp_path / "v.npz", x_train=x, y_train=y, x_val=x[:5], y_val=y[:5],
             x_test=x[:10], y_test=y[:10])
    data = load_dataset(DataConfig(source=str(tmp_path / "v.npz"), image_size=(12, 12)), seed=0)
    assert (len(data.y_train), len(data.y_val)) == (40, 5)


def test_hdf5_file(tmp_path):
    x, y = _arrays()
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for name, value in dict(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8]).items():
            f[name] = value
    data = load_dataset(DataConfig(source=str(tmp_path / "d.h5"), image_size=(12, 12)), seed=0)
    assert data.image_shape == (12, 12, 3) and len(data.y_test) == 8


def test_image_folder_with_and_without_split_folders(tmp_path):
    x, y = _arrays(size=(20, 20), n=24, classes=3)
    for root in ("flat", "split/train", "split/test"):
        for i, (image, label) in enumerate(zip(x, y)):
            folder = tmp_path / root / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    (tmp_path / "flat" / "class_0" / "notes.txt").write_text("not an image")
    flat = load_dataset(DataConfig(source=str(tmp_path / "flat"), image_size=(10, 10),
                                   val_fraction=0.25), seed=0)
    assert flat.image_shape == (10, 10, 3) and flat.num_classes == 3
    assert len(flat.y_train) + len(flat.y_val) + len(flat.y_test) == 24
    split = load_dataset(DataConfig(source=str(tmp_path / "split"), image_size=(10, 10)), seed=0)
    assert len(split.y_test) == 24 and len(split.y_train) + len(split.y_val) == 24


@pytest.mark.parametrize("case, message", [
    ("missing", r"does not exist"),
    ("names", r"must hold arrays named x_train, y_train, x_test, y_test"),
    ("shape", r"are 12x12, but data.image_size is 16x16"),
    ("nan", r"holds NaN or Inf"),
    ("labels", r"y_train of .* must be 40 integer labels"),
    ("format", r"unknown format"),
])
def test_bad_data_gets_a_clear_error(tmp_path, case, message):
    x, y = _arrays()
    path = tmp_path / "d.npz"
    size = (12, 12)
    if case == "names":
        np.savez(path, x_train=x, y_train=y)
    elif case == "shape":
        np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
        size = (16, 16)
    elif case == "nan":
        bad = x.astype(np.float32)
        bad[0, 0, 0, 0] = np.nan
        np.savez(path, x_train=bad, y_train=y, x_test=x, y_test=y)
    elif case == "labels":
        np.savez(path, x_train=x, y_train=y[:-1], x_test=x, y_test=y)
    elif case == "format":
        path = tmp_path / "d.csv"
        path.write_text("1,2\n")
    else:
        path = tmp_path / "absent.npz"
    with pytest.raises(UserError, match=message):
        load_dataset(DataConfig(source=str(path), image_size=size), seed=0)


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_dataset(DataConfig(source=str(tmp_path), image_size=(10, 10)), seed=0)


def test_unreadable_images_are_refused_or_skipped_and_counted(tmp_path):
    x, y = _arrays(size=(12, 12), n=12, classes=2)
    for i, (image, label) in enumerate(zip(x, y)):
        folder = tmp_path / f"c{label}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    (tmp_path / "c0" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"Cannot read the image .*broken.png.*bad_images"):
        load_dataset(DataConfig(source=str(tmp_path), image_size=(12, 12), val_fraction=0.2),
                     seed=0)
    data = load_dataset(DataConfig(source=str(tmp_path), image_size=(12, 12), val_fraction=0.2,
                                   bad_images="skip"), seed=0)
    assert data.summary()["skipped_images"] == 1
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 12


def test_the_test_split_counts_its_reads(tiny_dataset):
    """The pipeline refuses a final evaluation after any earlier read of the test split
    (honest selection): hashing, sizes and label checks do not count, reading does."""
    import dataclasses

    data = dataclasses.replace(tiny_dataset)  # a fresh counter
    assert data.test_reads == 0
    data.fingerprint(), data.summary(), data.uncounted("y_test")
    _ = data.x_train, data.x_val, data.y_val
    assert data.test_reads == 0
    _ = data.y_test
    assert data.test_reads == 1
    x, y = data.test_split()
    assert data.test_reads == 2 and len(x) == len(y) == data.summary()["test"]


def _jpeg_folder(root, n=30, classes=3, size=(20, 26)):
    rng = np.random.default_rng(5)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)


def test_image_folder_pixels_equal_keras_image_dataset_from_directory(tmp_path):
    """Decoded and resized (bilinear) as Keras does, so a teacher trained on
    image_dataset_from_directory sees the same pixels here; nothing is decoded at load."""
    import keras

    for split in ("train", "test"):
        _jpeg_folder(tmp_path / split)
    data = load_dataset(DataConfig(source=str(tmp_path), image_size=(12, 17), scale="none",
                                   val_fraction=0.2), seed=0)
    assert not data.x_train.in_memory and data.image_shape == (12, 17, 3)
    reference = keras.utils.image_dataset_from_directory(
        tmp_path / "test", image_size=(12, 17), shuffle=False, batch_size=None)
    expected = np.stack([np.asarray(image) for image, _ in reference])
    labels = np.array([int(label) for _, label in reference])
    x_test, y_test = data.test_split()
    np.testing.assert_array_equal(np.asarray(x_test), expected)
    np.testing.assert_array_equal(y_test, labels)
    rows = np.array([7, 2, 19])  # any rows, in any order
    np.testing.assert_array_equal(x_test[rows], expected[rows])
    unit = load_dataset(DataConfig(source=str(tmp_path), image_size=(12, 17), scale="unit",
                                   val_fraction=0.2), seed=0)
    np.testing.assert_allclose(np.asarray(unit.test_split()[0]), expected / 255.0, rtol=1e-6)


def test_a_damaged_image_is_named_when_it_is_read(tmp_path):
    _jpeg_folder(tmp_path, n=12, classes=2)
    victim = sorted((tmp_path / "class_0").iterdir())[1]
    content = victim.read_bytes()
    victim.write_bytes(content[:len(content) * 2 // 3])  # a valid header, pixels cut off
    data = load_dataset(DataConfig(source=str(tmp_path), image_size=(8, 8), val_fraction=0.2),
                        seed=0)
    everything = [data.x_train, data.x_val, data.uncounted("x_test")]
    with pytest.raises(UserError, match=rf"Cannot read the image .*{victim.name}"):
        for x in everything:
            np.asarray(x)


def test_hdf5_images_are_read_by_rows_not_loaded(tmp_path):
    x, y = _arrays(n=60)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for name, value in dict(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8]).items():
            f.create_dataset(name, data=value, chunks=True if name.startswith("x") else None)
    data = load_dataset(DataConfig(source=str(tmp_path / "d.h5"), image_size=(12, 12),
                                   val_fraction=0.25), seed=0)
    assert not data.x_train.in_memory
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    reference = load_dataset(DataConfig(source=str(tmp_path / "d.npz"), image_size=(12, 12),
                                        val_fraction=0.25), seed=0)
    assert reference.x_train.in_memory
    for split in ("x_train", "x_val"):
        lazy, loaded = getattr(data, split), np.asarray(getattr(reference, split))
        np.testing.assert_array_equal(np.asarray(lazy), loaded)
        rows = np.array([5, 0, 3, 4])  # unsorted, with a contiguous run
        np.testing.assert_array_equal(lazy[rows], loaded[rows])
        np.testing.assert_array_equal(np.asarray(lazy[2:6]), loaded[2:6])
    assert data.fingerprint() != reference.fingerprint()
    assert data.fingerprint() == load_dataset(DataConfig(
        source=str(tmp_path / "d.h5"), image_size=(12, 12), val_fraction=0.25), seed=0
    ).fingerprint()


def test_rank_0s_file_index_travels_and_workers_open_it_without_listing(tmp_path):
    """The index of an image folder or HDF5 file pickles without a pixel; a worker that
    received it reads rank 0's splits even after the folder changed (it lists nothing
    again), and one without it loads the data and refuses a different fingerprint."""
    _jpeg_folder(tmp_path / "folder", n=24)
    x, y = _arrays(n=40)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for name, value in dict(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8]).items():
            f.create_dataset(name, data=value)
    configs = [DataConfig(source=str(tmp_path / "folder"), image_size=(20, 26),
                          val_fraction=0.25),
               DataConfig(source=str(tmp_path / "d.h5"), image_size=(12, 12),
                          val_fraction=0.25)]
    for config in configs:
        data = load_dataset(config, seed=3)
        message = pickle.dumps(portable_index(data))
        assert len(message) < 20_000  # an index, not the pixels
        received = pickle.loads(message)
        assert received.fingerprint() == data.fingerprint()
        for split in ("x_train", "x_val"):
            np.testing.assert_array_equal(np.asarray(getattr(received, split)),
                                          np.asarray(getattr(data, split)))
        np.testing.assert_array_equal(received.y_val, data.y_val)
    folder = load_dataset(configs[0], seed=3)
    message = pickle.dumps(portable_index(folder))
    Image.fromarray(np.zeros((20, 26, 3), np.uint8)).save(tmp_path / "folder" / "class_0" /
                                                          "late.jpg")  # the folder changes
    with pytest.raises(UserError, match=r"expected .* \(rank 0's\)"):
        load_checked(configs[0], 3, folder.fingerprint())
    receive_index(pickle.loads(message))
    opened = load_checked(configs[0], 3, folder.fingerprint())
    assert len(opened.y_train) + len(opened.y_val) == 24 - len(opened.uncounted("y_test"))
    np.testing.assert_array_equal(opened.y_train, folder.y_train)


def test_data_held_in_memory_is_not_sent(tiny_dataset):
    assert portable_index(tiny_dataset) is None


def test_sequences_are_read_as_stored_from_npz_and_hdf5(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 40, 3)).astype(np.float32) * 300  # not pixels: no scaling
    y = rng.integers(0, 3, size=50)
    np.savez(tmp_path / "s.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    with h5py.File(tmp_path / "s.h5", "w") as f:
        for name, value in dict(x_train=x, y_train=y, x_test=x[:10], y_test=y[:10]).items():
            f[name] = value
    loaded = {}
    for name in ("s.npz", "s.h5"):
        data = load_dataset(DataConfig(source=str(tmp_path / name), kind="sequences"), seed=0)
        assert data.image_shape == (40, 3) and data.x_train.shape == (45, 40, 3)
        loaded[name] = np.asarray(data.x_train)
    np.testing.assert_array_equal(loaded["s.npz"], loaded["s.h5"])
    np.testing.assert_array_equal(loaded["s.npz"], x[np.sort(
        np.random.default_rng(0).permutation(50)[5:])])
    # A worker opens the HDF5 sequences from the index rank 0 sends.
    data = load_dataset(DataConfig(source=str(tmp_path / "s.h5"), kind="sequences"), seed=0)
    travelled = pickle.loads(pickle.dumps(data.x_train))
    np.testing.assert_array_equal(np.asarray(travelled), loaded["s.h5"])
    # One channel without its axis gets one; images' ranks are refused with the expectation.
    np.savez(tmp_path / "m.npz", x_train=x[..., 0], y_train=y, x_test=x[:10, :, 0],
             y_test=y[:10])
    mono = load_dataset(DataConfig(source=str(tmp_path / "m.npz"), kind="sequences"), seed=0)
    assert mono.image_shape == (40, 1)
    np.savez(tmp_path / "i.npz", x_train=x[..., None, None], y_train=y, x_test=x[:10, ..., None],
             y_test=y[:10])
    with pytest.raises(UserError, match=r"must be sequences of shape \(N, steps, channels\) "
                                        r"\(data.kind = 'sequences'\), received shape"):
        load_dataset(DataConfig(source=str(tmp_path / "i.npz"), kind="sequences"), seed=0)
