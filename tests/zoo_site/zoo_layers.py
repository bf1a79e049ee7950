"""A custom layer as users register theirs; importable by every rank through
`sitecustomize.py` beside it on PYTHONPATH (docs/troubleshooting.md)."""

import keras


@keras.saving.register_keras_serializable(package="zoo")
class ScaledSwish(keras.layers.Layer):
    """x * sigmoid(beta * x) with a learned beta: an activation Keras does not ship."""

    def build(self, input_shape):
        self.beta = self.add_weight(shape=(), initializer="ones", name="beta")

    def call(self, x):
        return x * keras.ops.sigmoid(self.beta * x)
