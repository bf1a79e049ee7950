"""BatchNormalization folded into the layer before it (model/fold.py): the same outputs,
fewer layers, and only where the fold is exact."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from pbkd_mpi.model.fold import fold_batchnorm


def _trained_norm(norm, rng):
    """BN statistics and affine weights far from their defaults, so a wrong fold shows."""
    norm.set_weights([rng.uniform(0.5, 2.0, w.shape).astype(np.float32)
                      if "variance" in w.path or "gamma" in w.path
                      else rng.normal(size=w.shape).astype(np.float32) for w in norm.weights])


def _model():
    inputs = keras.Input((12, 12, 4))
    a = layers.BatchNormalization(name="bn_a")(layers.Conv2D(8, 3, name="conv")(inputs))
    b = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=True,
                               name="dw")(layers.ReLU()(a))
    b = layers.ReLU()(layers.BatchNormalization(name="bn_b")(b))
    shared = layers.Conv2D(16, 1, name="shared")(b)  # read twice: not foldable
    c = layers.Add()([layers.BatchNormalization(name="bn_c")(shared), shared])
    s = layers.BatchNormalization(name="bn_s")(layers.SeparableConv2D(16, 3, name="sep")(c))
    d = layers.Dense(5, name="dense")(layers.GlobalAveragePooling2D()(s))
    return keras.Model(inputs, layers.BatchNormalization(name="bn_d")(d))


def test_foldable_bns_are_folded_and_the_outputs_kept():
    rng = np.random.default_rng(0)
    model = _model()
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            _trained_norm(layer, rng)
    x = rng.normal(size=(8, 12, 12, 4)).astype(np.float32)
    folded, info = fold_batchnorm(model, x)
    names = {layer.name for layer in folded.layers}
    # After a conv, a depthwise conv with a multiplier and a Dense: folded. After a conv
    # another layer reads too, or a separable conv: kept.
    assert info["layers"] == 3 and not names & {"bn_a", "bn_b", "bn_d"}
    assert {"bn_c", "bn_s", "conv", "dw", "dense", "shared", "sep"} <= names
    assert folded.get_layer("conv").use_bias and folded.get_layer("dw").use_bias
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-4)
    assert info["max_abs_diff"] < 1e-4


def test_a_model_without_foldable_bns_is_returned_as_it_is():
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, layers.Conv2D(4, 3, activation="relu")(inputs))
    same, info = fold_batchnorm(model, np.zeros((2, 6, 6, 3), np.float32))
    assert same is model and info == {"layers": 0, "max_abs_diff": 0.0}


def test_the_folded_student_saves_and_converts(tmp_path):
    import tensorflow as tf

    from pbkd_mpi.output.exports import TfliteModel

    model = _model()
    x = np.random.default_rng(1).normal(size=(4, 12, 12, 4)).astype(np.float32)
    folded, _ = fold_batchnorm(model, x)
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras")
    expected = folded.predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-5)
    path = tmp_path / "folded.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(folded).convert())
    np.testing.assert_allclose(TfliteModel(path, threads=1)(x), expected, atol=1e-4)
