"""Rewrite the teacher's graph into the student: each trained block replaced, the rest copied.

Layers outside the replaced blocks are fresh copies of the teacher's layers carrying the
teacher's weights, not the teacher's layer objects themselves: fine-tuning the student must
never change the teacher.
"""

from __future__ import annotations

import keras

from .graph import Block, chain_layers
from .students import apply_layers, layer_weights, student_layers


def copy_layer(layer):
    return layer.__class__.from_config(layer.get_config())


def rewrite(teacher, blocks: list[Block], make_layers, weights: dict[str, list]) -> keras.Model:
    """A new model following the teacher's chain, with `make_layers(block)` in place of
    each block's layers; every layer's weights are then set from `weights` by layer name."""
    by_first_layer = {block.layers[0]: block for block in blocks}
    layers = chain_layers(teacher)
    source = teacher.inputs[0]
    inputs = keras.Input(source.shape[1:], dtype=source.dtype, name=source.name)
    tensor, i = inputs, 0
    while i < len(layers):
        block = by_first_layer.get(layers[i].name)
        if block is None:
            tensor = copy_layer(layers[i])(tensor)
            i += 1
        else:
            tensor = apply_layers(make_layers(block), tensor)
            i += len(block.layers)
    model = keras.Model(inputs, tensor, name=f"{teacher.name}_student")
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(weights[layer.name])
    return model


def assemble_student(teacher, blocks: list[Block], block_weights: dict[str, dict],
                     depth_multiplier: int = 1) -> keras.Model:
    """The student: blocks with trained weights in `block_weights` are replaced by their
    students; blocks without stay the teacher's."""
    weights = layer_weights(teacher)
    for per_layer in block_weights.values():
        weights.update(per_layer)
    replaced = [block for block in blocks if block.name in block_weights]
    return rewrite(teacher, replaced, lambda block: student_layers(block, depth_multiplier),
                   weights)
