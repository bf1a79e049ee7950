"""Blocks of a chain-shaped teacher: every Conv2D with the BN and activations that follow it.

A block is described by plain data (names, shapes, counts), so it can be printed, sent to
another rank and written to the report without carrying Keras objects along.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras

from .cost import layers_cost
from .errors import UserError

MODEL_INPUT = "__input__"  # boundary name of the model's input tensor

# Layers that may follow a conv inside its block: they act element-wise or per channel.
_FOLLOWERS = (
    keras.layers.BatchNormalization,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
)


@dataclass(frozen=True)
class Block:
    name: str
    layers: tuple[str, ...]
    input_boundary: str  # the layer whose output feeds the block, or MODEL_INPUT
    output_boundary: str  # the block's last layer
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    output_shape: tuple[int, ...]
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: str
    dilation_rate: tuple[int, int]
    final_activation: str  # "linear" when the block ends before any activation
    teacher_params: int
    teacher_flops: int

    def to_dict(self) -> dict:
        return asdict(self)


def is_conv2d(layer) -> bool:
    """A full Conv2D: depthwise, separable and transposed convs are already cheap or differ."""
    return isinstance(layer, keras.layers.Conv2D) and not isinstance(
        layer,
        (keras.layers.Conv2DTranspose, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D),
    )


def check_graph_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise UserError(f"The teacher must be a keras.Model, received {type(model).__name__}.")
    if not (isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"):
        raise UserError(
            f"The teacher is a subclassed model ({type(model).__name__}) with no layer graph "
            f"to cut into blocks. Rebuild it with the Functional API or keras.Sequential "
            f"(same layers, same weights) and save that as .keras."
        )


def chain_layers(model) -> list:
    """The model's layers in order, checking that each feeds only the next."""
    check_graph_model(model)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(
            f"The teacher must have one input and one output, received {len(model.inputs)} "
            f"inputs and {len(model.outputs)} outputs."
        )
    previous = model.inputs[0]
    for layer in layers:
        if len(layer._inbound_nodes) != 1:
            raise UserError(
                f"Layer {layer.name!r} of the teacher is used {len(layer._inbound_nodes)} times; "
                f"only chain-shaped models (each layer used once, in sequence) are supported."
            )
        if isinstance(layer, keras.Model):
            raise UserError(
                f"Layer {layer.name!r} of the teacher is a nested model; only flat "
                f"chain-shaped models are supported."
            )
        if layer.input is not previous:
            raise UserError(
                f"The teacher is not a chain: layer {layer.name!r} does not take the output "
                f"of the layer before it (skip connections and branches are not supported)."
            )
        previous = layer.output
    return layers


def _activation_name(layer) -> str | None:
    """The activation a layer applies, or None for a layer that is not an activation."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope:
            return f"leaky_relu({float(layer.negative_slope)})"
        if layer.max_value is not None:
            return f"relu_max({float(layer.max_value)})"
        return "relu"
    if isinstance(layer, keras.layers.LeakyReLU):
        return f"leaky_relu({float(layer.negative_slope)})"
    if isinstance(layer, keras.layers.ELU):
        return "elu"
    if isinstance(layer, keras.layers.PReLU):
        return "prelu"
    if isinstance(layer, keras.layers.Activation) or is_conv2d(layer):
        name = keras.activations.serialize(layer.activation)
        return name if isinstance(name, str) else name.get("config", {}).get("name", "linear")
    return None


def find_blocks(model) -> list[Block]:
    layers = chain_layers(model)
    blocks = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if not is_conv2d(layer):
            i += 1
            continue
        members = [layer]
        while i + len(members) < len(layers) and isinstance(layers[i + len(members)], _FOLLOWERS):
            members.append(layers[i + len(members)])
        final = "linear"
        for member in members:
            name = _activation_name(member)
            if name is not None and name != "linear":
                final = name
            elif isinstance(member, keras.layers.BatchNormalization):
                final = "linear"  # a BN after an activation ends the block on an affine map
        params, flops = layers_cost(members)
        blocks.append(
            Block(
                name=layer.name,
                layers=tuple(m.name for m in members),
                input_boundary=layers[i - 1].name if i > 0 else MODEL_INPUT,
                output_boundary=members[-1].name,
                input_shape=tuple(int(d) for d in layer.input.shape[1:]),
                output_shape=tuple(int(d) for d in members[-1].output.shape[1:]),
                kernel_size=tuple(layer.kernel_size),
                strides=tuple(layer.strides),
                padding=layer.padding,
                dilation_rate=tuple(layer.dilation_rate),
                final_activation=final,
                teacher_params=params,
                teacher_flops=flops,
            )
        )
        i += len(members)
    if not blocks:
        raise UserError(
            f"The teacher {model.name!r} has no Conv2D layer, so there is no block to distill."
        )
    return blocks


def boundaries(blocks) -> list[str]:
    """The tensors the cache must hold: each block's input and output, once each."""
    seen = []
    for block in blocks:
        for name in (block.input_boundary, block.output_boundary):
            if name not in seen:
                seen.append(name)
    return seen
