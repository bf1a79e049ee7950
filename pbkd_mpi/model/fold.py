"""The deployed student with its batch normalisation folded into the convs before it.

At inference a BN computes gamma * (x - mean) / sqrt(variance + epsilon) + beta per
channel: after a conv (or Dense, or depthwise conv) whose output nothing else reads, that
is the same conv with its output channels scaled and a bias added. TFLite's converter
folds these itself; Keras and TensorFlow run each BN as one more pass over its tensor (the
demo's student at batch 32 in Keras: 7.85 ms with its BNs, 6.51 ms folded).
"""

from __future__ import annotations

import keras
import numpy as np

from pbkd_mpi.model.evaluate import predict_batches
from pbkd_mpi.model.graph import flatten_model, graph_nodes, refresh_state, replay

# Keras' separable and transposed convs are none of these classes: they keep their BNs.
_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.DepthwiseConv1D,
             keras.layers.DepthwiseConv2D, keras.layers.Dense)
# Largest difference the fold may make to the model's outputs (softmax probabilities or
# logits of order 1): float32 rounding of the rescaled kernels, far below it in practice.
TOLERANCE = 1e-3


def fold_batchnorm(model, check_images) -> tuple[keras.Model, dict]:
    """(the model with every foldable BN folded, {"layers": how many, "max_abs_diff": the
    largest output difference on `check_images`}); the model itself when none is."""
    model = flatten_model(model)
    pairs = _foldable(model)  # BN name -> the conv layer before it
    if not pairs:
        return model, {"layers": 0, "max_abs_diff": 0.0}
    convs = {conv.name: model.get_layer(norm) for norm, conv in pairs.items()}
    copies = {}  # layer name -> (new layer, old layer)

    def call(node, args, kwargs):
        layer = node.operation
        if layer.name in pairs:
            return args[0]  # the folded conv's output is already normalised
        if not isinstance(layer, keras.layers.Layer):
            return layer(*args, **kwargs)
        config = layer.get_config() | ({"use_bias": True} if layer.name in convs else {})
        copies[layer.name] = (layer.__class__.from_config(config), layer)
        return copies[layer.name][0](*args, **kwargs)

    source = model.inputs[0]
    inputs = keras.Input(source.shape[1:], dtype=source.dtype, name=source.name)
    folded = keras.Model(inputs, replay(model, [inputs], call)[0], name=model.name)
    for name, (new, old) in copies.items():
        if old.weights:
            new.set_weights(_folded_weights(old, convs[name]) if name in convs
                            else old.get_weights())
    refresh_state(folded)
    x = np.asarray(check_images, np.float32)
    diff = float(np.max(np.abs(predict_batches(folded, x) - predict_batches(model, x))))
    if not diff <= TOLERANCE:
        raise RuntimeError(f"folding {len(pairs)} BatchNormalization layer(s) changed the "
                           f"model's outputs by {diff:.3g} (expected at most {TOLERANCE}); "
                           f"set export.fold_batchnorm = false to keep them.")
    return folded, {"layers": len(pairs), "max_abs_diff": diff}


def _foldable(model) -> dict:
    """{BN name: conv} for each channels-last BN right after a linear conv whose output
    only that BN reads."""
    readers: dict[str, int] = {}
    for node in graph_nodes(model):
        for tensor in node.input_tensors:
            producer = tensor._keras_history.operation
            readers[producer.name] = readers.get(producer.name, 0) + 1
    pairs = {}
    for node in graph_nodes(model):
        norm = node.operation
        if not isinstance(norm, keras.layers.BatchNormalization) or len(node.input_tensors) != 1:
            continue
        conv = node.input_tensors[0]._keras_history.operation
        axis = norm.axis if isinstance(norm.axis, int) else list(norm.axis)
        rank = len(node.input_tensors[0].shape)
        if (isinstance(conv, _FOLDABLE) and readers.get(conv.name) == 1
                and axis in (-1, rank - 1, [-1], [rank - 1])
                and conv.get_config().get("activation", "linear") == "linear"
                and conv.get_config().get("data_format", "channels_last") == "channels_last"):
            pairs[norm.name] = conv
    return pairs


def _folded_weights(conv, norm) -> list:
    """[kernel, bias] of `conv` with `norm` applied after it."""
    weights = conv.get_weights()
    values = dict(zip([w.path.split("/")[-1] for w in norm.weights], norm.get_weights()))
    channels = values["moving_mean"].shape[0]
    gamma = values.get("gamma", np.ones(channels, np.float32))
    beta = values.get("beta", np.zeros(channels, np.float32))
    scale = gamma / np.sqrt(values["moving_variance"] + norm.epsilon)
    bias = weights[1] if conv.use_bias else np.zeros(channels, np.float32)
    if isinstance(conv, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        # (..., c_in, m): output channel c * m + j comes from input channel c's j-th filter.
        kernel = weights[0] * scale.reshape(weights[0].shape[-2:])
    else:
        kernel = weights[0] * scale
    return [kernel.astype(np.float32), ((bias - values["moving_mean"]) * scale + beta
                                        ).astype(np.float32)]
