"""Teachers as users write them, for tests/mpi/test_zoo.py: augmentation inside the model
(as a nested Sequential and as a plain layer), an adapted Normalization, Dropout,
SpatialDropout2D and GaussianNoise, a registered custom layer inside a replaced residual
block and outside any block, a mixed_float16 policy, saved as .keras or as a legacy .h5."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SITE = Path(__file__).resolve().parent / "zoo_site"  # on every rank's PYTHONPATH


def tutorial_teacher(x_adapt: np.ndarray, classes: int):
    """Keras' image-classification tutorial, with every training-only layer kind, and the
    custom ScaledSwish inside a residual block (replaced whole at `block` granularity)
    and after the global pool (never replaced)."""
    import keras
    from keras import layers

    sys.path.insert(0, str(SITE))
    from zoo_layers import ScaledSwish

    augment = keras.Sequential([layers.RandomFlip("horizontal"),
                                layers.RandomTranslation(0.1, 0.1)], name="augmentation")
    norm = layers.Normalization(name="normalization")
    norm.adapt(x_adapt)
    inputs = keras.Input(x_adapt.shape[1:])
    x = layers.RandomContrast(0.1)(norm(augment(inputs)))
    x = layers.GaussianNoise(0.05)(x)
    for i, width in enumerate((16, 32), start=1):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.SpatialDropout2D(0.1)(layers.MaxPooling2D()(x))
    skip = x
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv3")(x)
    x = ScaledSwish(name="swish3")(layers.BatchNormalization(name="bn3")(x))
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv4")(x)
    x = layers.BatchNormalization(name="bn4")(x)
    x = layers.ReLU(name="relu4")(layers.Add(name="add")([x, skip]))
    x = ScaledSwish(name="swish_head")(layers.GlobalAveragePooling2D()(x))
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))


def mixed_precision_teacher(image_shape, classes: int):
    """A plain CNN under the mixed_float16 policy (float32 softmax, as Keras advises)."""
    import keras
    from keras import layers

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input(image_shape)
        x = layers.Rescaling(1 / 255.0)(inputs)
        for i, width in enumerate((16, 16, 32), start=1):
            x = layers.Conv2D(width, 3, padding="same", name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(x))
        outputs = layers.Dense(classes, activation="softmax", dtype="float32")(x)
        return keras.Model(inputs, outputs)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def train_briefly(model, x, y, epochs: int = 2):
    import keras

    keras.utils.set_random_seed(0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model
