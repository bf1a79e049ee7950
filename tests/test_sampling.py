"""Samples of a split are seeded random samples, never its first rows: a folder of photos
keeps its class folders' order, so the first rows are one class."""

from __future__ import annotations

import numpy as np
import pytest

from pbkd_mpi.data.images import sample_batches, sample_images, sample_rows


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """A class-sorted image folder (train/<class>/, test/<class>/) loaded as users load
    theirs: 3 classes, 2,400 training images at 16 px."""
    from pbkd_mpi.config import DataConfig
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.data.demo import write_image_folder

    root = tmp_path_factory.mktemp("sorted") / "photos"
    write_image_folder(root, train=2400, test=400, size=(16, 16), classes=3, noise=0.02)
    return load_dataset(DataConfig(source=str(root), image_size=(16, 16), scale="unit",
                                   val_fraction=0.2), seed=0)


def test_the_folder_is_sorted_by_class_and_samples_hold_every_class(sorted_folder):
    y = sorted_folder.y_train
    assert np.all(np.diff(y) >= 0)  # what the first rows would have been: class 0 only
    rows = sample_rows(len(y), 400, seed=3)
    assert len(set(rows.tolist())) == 400
    histogram = np.bincount(y[rows], minlength=3)
    assert histogram.min() >= 100, histogram  # 133 each expected
    assert np.array_equal(rows, sample_rows(len(y), 400, seed=3))  # seeded
    assert not np.array_equal(rows, sample_rows(len(y), 400, seed=4))
    # Each batch of a sample mixes the classes (BN averages statistics over batches).
    labels = {tuple(np.unique(y[np.sort(rows[i:i + 50])])) for i in range(0, 400, 50)}
    assert all(len(classes) == 3 for classes in labels)
    images = sample_images(sorted_folder.x_train, 40, seed=3)
    batches = list(sample_batches(sorted_folder.x_train, 16, 40, seed=3))
    assert images.shape == (40, 16, 16, 3) and [len(b) for b in batches] == [16, 16, 8]
    np.testing.assert_array_equal(np.sort(images.reshape(40, -1), axis=0),
                                  np.sort(np.concatenate(batches).reshape(40, -1), axis=0))


def test_teacher_accuracy_with_re_estimated_bn_stays_within_a_point(sorted_folder):
    import keras

    from pbkd_mpi.model.evaluate import accuracy, recalibrate_batchnorm, recalibrated_accuracy
    from pbkd_mpi.model.teacher import build_vgg_demo, fit_classifier

    data = sorted_folder
    keras.utils.set_random_seed(0)
    teacher = build_vgg_demo(data.image_shape, 3, (8, 16, 16, 32))
    fit_classifier(teacher, data, epochs=5, batch_size=32, learning_rate=3e-3, patience=5,
                   probabilities=True, seed=0)
    # The teacher's statistics made those of the whole training split (a short training
    # leaves its moving averages behind its weights): re-estimating them on a fair sample
    # then changes little.
    recalibrate_batchnorm(teacher, data.x_train, samples=len(data.y_train))
    plain = accuracy(teacher, data.x_val, data.y_val)
    assert plain > 0.6, plain  # learned: chance is 0.33

    def re_estimated(x_calibrate):
        copy = keras.models.clone_model(teacher)
        copy.set_weights(teacher.get_weights())
        return recalibrated_accuracy(copy, data.x_val, data.y_val, x_calibrate, samples=400)

    # 400 of 1,920 training images, a seeded random sample of the class-sorted split.
    sampled = re_estimated(data.x_train)
    assert abs(sampled - plain) <= 0.01, (plain, sampled)
    # What the first 400 rows (class 0 alone) did to it: the failure this guards against.
    first_rows = re_estimated(data.x_train[np.arange(400)])
    assert plain - first_rows > 0.05, (plain, first_rows)
