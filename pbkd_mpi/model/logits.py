"""Logits of a classifier, for distillation on soft targets.

Hinton distillation needs the pre-softmax tensor of both teacher and student. A Keras
classifier usually ends in `Dense(activation="softmax")`, where that tensor is never a layer
output. So the activation cache holds the *input* of the final layer (a layer output the
cache can read, e.g. the global pooling) and the teacher's logits are that tensor times
the final Dense's kernel plus its bias, computed once per rank in NumPy; the teacher never
runs during fine-tuning. For the student, `logits_model` builds a model sharing every
variable with the student whose output is the same pre-softmax tensor.

Three endings are understood: Dense with softmax (the logits are recomputed from its
input), a Softmax or softmax Activation layer (its input is the logits), anything else (the
output already is the logits).
"""

from __future__ import annotations

import numpy as np


def _is_softmax(activation) -> bool:
    return activation is not None and getattr(activation, "__name__", "") == "softmax"


def _ending(model) -> str:
    import keras

    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense) and _is_softmax(last.activation):
        return "dense_softmax"
    if isinstance(last, keras.layers.Softmax) or (
            isinstance(last, keras.layers.Activation) and _is_softmax(last.activation)):
        return "softmax_layer"
    return "logits"


def _inbound_layer_name(model) -> str:
    """The name of the layer whose output feeds the final layer."""
    last = model.layers[-1]
    tensor = last.input
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        raise ValueError(f"cannot find the layer feeding {last.name!r}")
    return history[0].name


def logit_boundary(model) -> str:
    """The layer whose cached output gives the teacher's logits (see the module doc)."""
    if _ending(model) == "logits":
        return model.layers[-1].name
    return _inbound_layer_name(model)


def final_affine(model):
    """(kernel, bias or None) that turn the output of `logit_boundary(model)` into logits,
    or None when that output already is the logits."""
    if _ending(model) != "dense_softmax":
        return None
    kernel, *bias = [np.asarray(w, np.float32) for w in model.layers[-1].get_weights()]
    return kernel, (bias[0] if bias else None)


def logits_from_boundary(model, cached: np.ndarray) -> np.ndarray:
    """The teacher's logits (float32) from the cached output of `logit_boundary(model)`."""
    return apply_affine(final_affine(model), cached)


def apply_affine(affine, cached: np.ndarray) -> np.ndarray:
    """`final_affine`'s (kernel, bias) applied to cached boundary values, as float32."""
    cached = np.asarray(cached, dtype=np.float32)
    if affine is None:
        return cached
    kernel, bias = affine
    return cached @ kernel + (bias if bias is not None else 0.0)


def _inputs(model):
    # One input as a tensor, not a one-element list: Keras warns on every call otherwise.
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def logits_model(model):
    """A model sharing all of `model`'s variables whose output is its pre-softmax tensor."""
    import keras

    ending = _ending(model)
    if ending == "logits":
        return model
    last = model.layers[-1]
    if ending == "softmax_layer":
        return keras.Model(_inputs(model), last.input, name=f"{model.name}_logits")
    return keras.Model(_inputs(model), _shared_linear_class()(last)(last.input),
                       name=f"{model.name}_logits")


_SHARED_LINEAR = []


def _shared_linear_class():
    """Defined on first use so that importing this module does not import Keras."""
    import keras

    if _SHARED_LINEAR:
        return _SHARED_LINEAR[0]

    class SharedLinear(keras.layers.Layer):
        """The affine part of an existing Dense layer, sharing its variables (the layer is
        tracked as a sublayer, so its kernel and bias train through this one)."""

        def __init__(self, dense, **kwargs):
            super().__init__(**kwargs)
            self.dense = dense

        def call(self, x):
            y = keras.ops.matmul(x, self.dense.kernel)
            if self.dense.use_bias:
                y = y + self.dense.bias
            return y

    _SHARED_LINEAR.append(SharedLinear)
    return SharedLinear
