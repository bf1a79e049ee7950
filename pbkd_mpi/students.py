"""Student blocks: depthwise-separable replacements with the teacher block's shapes and ending.

depthwise kxk (the teacher's stride, padding and dilation) -> BN -> ReLU -> pointwise 1x1
to the teacher's channels -> BN -> the teacher block's final activation (none when the
teacher block ends pre-activation). Layer names derive from the block's name, so the
weights trained on a worker find their layers in the assembled student by name.
"""

from __future__ import annotations

import re

import keras

from .graph import Block

# Keras' default 0.99 needs hundreds of steps before the moving statistics that inference
# uses catch up; a block task may run only a few hundred steps in all.
BN_MOMENTUM = 0.9


def make_activation(name: str, layer_name: str):
    """A layer applying a final activation named as graph.find_blocks names them."""
    match = re.fullmatch(r"(leaky_relu|relu_max)\(([-0-9.e]+)\)", name)
    if match:
        value = float(match.group(2))
        if match.group(1) == "leaky_relu":
            return keras.layers.LeakyReLU(negative_slope=value, name=layer_name)
        return keras.layers.ReLU(max_value=value, name=layer_name)
    if name == "relu":
        return keras.layers.ReLU(name=layer_name)
    if name == "prelu":
        return keras.layers.PReLU(shared_axes=[1, 2], name=layer_name)
    if name == "elu":
        return keras.layers.ELU(name=layer_name)
    return keras.layers.Activation(name, name=layer_name)


def student_layers(block: Block) -> list:
    """Fresh, unbuilt layers of the block's student, in the order they are applied."""
    prefix = f"{block.name}_student"
    layers = [
        keras.layers.DepthwiseConv2D(
            block.kernel_size,
            strides=block.strides,
            padding=block.padding,
            dilation_rate=block.dilation_rate,
            use_bias=False,
            name=f"{prefix}_dw",
        ),
        keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_dw_bn"),
        keras.layers.ReLU(name=f"{prefix}_dw_relu"),
        keras.layers.Conv2D(block.output_shape[-1], 1, use_bias=False, name=f"{prefix}_pw"),
        keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_pw_bn"),
    ]
    if block.final_activation != "linear":
        layers.append(make_activation(block.final_activation, f"{prefix}_act"))
    return layers


def apply_layers(layers, tensor):
    for layer in layers:
        tensor = layer(tensor)
    return tensor


def build_student_model(block: Block) -> keras.Model:
    """The student block as a standalone model from block input to block output."""
    inputs = keras.Input(block.input_shape, name=f"{block.name}_input")
    layers = student_layers(block)
    outputs = apply_layers(layers, inputs)
    if tuple(outputs.shape[1:]) != tuple(block.output_shape):
        raise ValueError(
            f"Student of block {block.name!r} produces shape {tuple(outputs.shape[1:])}, "
            f"expected the teacher block's {block.output_shape}."
        )
    return keras.Model(inputs, outputs, name=f"{block.name}_student")


def layer_weights(model) -> dict[str, list]:
    """Weights by layer name: what a worker sends back and the assembler sets."""
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
