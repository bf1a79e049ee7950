"""The inference copy: a teacher as users write them, without the layers that only act in
training, computing what the teacher computes at inference."""

from __future__ import annotations

import numpy as np


def _user_style_model():
    """Keras' image-classification tutorial, with every kind of training-only layer: a
    nested augmentation Sequential, Rescaling, dropout and noise, and a registered custom
    layer (which must stay)."""
    import keras

    @keras.saving.register_keras_serializable(package="pbkd_tests")
    class Scale(keras.layers.Layer):
        def call(self, x):
            return x * 0.5

    # Named: Keras numbers unnamed layers per process, and other tests make some too.
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal", name="random_flip"),
                                keras.layers.RandomTranslation(0.1, 0.1,
                                                               name="random_translation"),
                                keras.layers.RandomRotation(0.05, name="random_rotation")],
                               name="augment")
    inputs = keras.Input((16, 16, 3))
    norm = keras.layers.Normalization(name="normalization")  # adapted: state beside weights
    norm.adapt(np.random.default_rng(1).uniform(0, 1, (64, 16, 16, 3)).astype(np.float32))
    x = norm(keras.layers.Rescaling(1 / 255.0)(augment(inputs)))
    x = keras.layers.GaussianNoise(0.1, name="gaussian_noise")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.SpatialDropout2D(0.2, name="spatial_dropout2d")(x)
    x = Scale(name="custom")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_training_only_layers_are_left_out_and_outputs_are_equal_at_inference():
    from pbkd_mpi.model.inference import inference_copy

    model = _user_style_model()
    copy, removed = inference_copy(model)
    assert removed == ["random_flip", "random_translation", "random_rotation",
                       "gaussian_noise", "spatial_dropout2d", "dropout"]
    kinds = [type(layer).__name__ for layer in copy.layers]
    assert kinds == ["InputLayer", "Rescaling", "Normalization", "Conv2D", "BatchNormalization", "ReLU",
                     "Scale", "GlobalAveragePooling2D", "Dense"]
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(copy.predict(x, verbose=0), model.predict(x, verbose=0))
    # The original keeps its layers, each called once (the copy shares none of them).
    assert len(model.get_layer("conv1")._inbound_nodes) == 1
    assert inference_copy(copy) == (copy, [])


def test_a_layer_that_is_not_the_identity_at_inference_stays():
    import keras

    from pbkd_mpi.model.inference import identity_at_inference, inference_copy

    class HalvingDropout(keras.layers.Dropout):  # a training-only class that is not
        def call(self, x, training=False):       # the identity at inference
            return x * 0.5

    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Dropout(0.5, name="plain")(inputs)
    model = keras.Model(inputs, HalvingDropout(0.5, name="halving")(x))
    copy, removed = inference_copy(model)
    assert removed == ["plain"] and [layer.name for layer in copy.layers][1:] == ["halving"]
    # A probe needs every size but the batch's: an unknown one proves nothing.
    assert identity_at_inference(keras.layers.Dropout(0.5), (None, 4, 2))
    assert not identity_at_inference(keras.layers.Dropout(0.5), (None, None, 2))
