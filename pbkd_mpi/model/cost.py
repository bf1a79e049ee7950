"""Parameter and FLOP counts of Keras layers, from their configuration and output shapes.

FLOPs count a multiply-add as two operations, for one sample at inference. Layers not
listed cost one operation per output element (activations, adds, pooling), which keeps the
totals honest without pretending a precision the hardware does not give anyway.
"""

from __future__ import annotations

import contextlib
import math

import keras


_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D)


def _elements(shape) -> int:
    return math.prod(int(d) for d in shape[1:])


def activation_bytes(model) -> int:
    """Bytes of every layer's output for one sample, as float32: what backpropagation
    keeps from the forward pass, and what an eager call of a Functional model holds until
    it returns (measured: 47 of 54 MB a sample for a ResNet50 stem at 224 px)."""
    values = 0
    for layer in model.layers:
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        values += sum(_elements(output.shape) for output in outputs)
    return 4 * values


def layer_flops(layer) -> int:
    if isinstance(layer, keras.layers.InputLayer):
        return 0
    out_shape = layer.output.shape
    if not hasattr(layer.input, "shape"):  # a merge (Add, Concatenate): one op per output
        return _elements(out_shape)
    in_shape = layer.input.shape
    out_elements = _elements(out_shape)
    if isinstance(layer, _SEPARABLE):
        window = math.prod(layer.kernel_size)
        c_in = in_shape[-1]
        spatial = _elements(out_shape) // out_shape[-1]
        depthwise = 2 * spatial * window * c_in * layer.depth_multiplier
        pointwise = 2 * spatial * c_in * layer.depth_multiplier * out_shape[-1]
        return depthwise + pointwise + (out_elements if layer.use_bias else 0)
    if isinstance(layer, _DEPTHWISE):
        window = math.prod(layer.kernel_size)
        return 2 * out_elements * window + (out_elements if layer.use_bias else 0)
    if isinstance(layer, _CONVS):
        c_in = in_shape[-1] // layer.groups
        window = math.prod(layer.kernel_size)
        return 2 * out_elements * window * c_in + (out_elements if layer.use_bias else 0)
    if isinstance(layer, keras.layers.Dense):
        return 2 * _elements(in_shape) * layer.units + (layer.units if layer.use_bias else 0)
    if isinstance(layer, keras.layers.BatchNormalization):
        return 2 * out_elements  # a scale and a shift once folded
    return out_elements


def model_flops(model) -> int:
    return sum(layer_flops(layer) for layer in model.layers)


def layer_params(layer) -> int:
    """Parameters of a layer; 0 for a bare operation in the graph (ConvNeXt's `x + y` is a
    keras.ops Add, which has no weights and no count_params)."""
    count = getattr(layer, "count_params", None)
    return int(count()) if count is not None else 0


def layers_cost(layers) -> tuple[int, int]:
    """(params, flops) of layers that are already called on tensors."""
    return (
        sum(layer_params(layer) for layer in layers),
        sum(layer_flops(layer) for layer in layers),
    )


@contextlib.contextmanager
def shapes_only():
    """Build layers without drawing their weights: counting parameters and FLOPs, and
    cutting a graph into blocks, need shapes only, and drawing the weights of large
    students (and of flattened copies of nested teachers) took most of the time of
    planning (ConvNeXtXLarge at `layer` granularity: 45 s). Keras defers the
    initialisers of variables made in a StatelessScope and lists them for a later
    initialisation; they are dropped from that list here, so that no later scope
    initialises them."""
    from keras.src.backend.common import global_state

    pending = list(global_state.get_global_attribute("uninitialized_variables", []))
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute("uninitialized_variables", pending)
