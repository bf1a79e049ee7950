"""Rewrite the teacher's graph into the student: each trained block replaced, the rest copied.

Layers outside the replaced blocks are fresh copies of the teacher's layers carrying the
teacher's weights, not the teacher's layer objects themselves: fine-tuning the student must
never change the teacher.
"""

from __future__ import annotations

import keras

from pbkd_mpi.model.evaluate import recalibrate_batchnorm
from pbkd_mpi.model.graph import (Block, MODEL_INPUT, copy_layer, flatten_model, graph_nodes,
                                  refresh_state, replay)
from pbkd_mpi.model.students import apply_student, layer_weights
from pbkd_mpi.model.teacher import save_model_atomically

__all__ = ["assemble_student", "copy_block", "copy_layer", "rewrite"]


def rewrite(teacher, blocks: list[Block], make_block, weights: dict[str, list],
            tensors: dict | None = None) -> keras.Model:
    """A new model following the teacher's graph, with `make_block(block, tensor)` (which
    returns the block's output tensor) in place of each block's layers; every layer's
    weights are then set from `weights` by layer name. `tensors`, when given, receives
    {teacher layer name (or graph.MODEL_INPUT): the new model's tensor there}."""
    teacher = flatten_model(teacher)
    source = teacher.inputs[0]
    inputs = keras.Input(source.shape[1:], dtype=source.dtype, name=source.name)
    owner = {name: block for block in blocks for name in block.layers}
    outputs = {MODEL_INPUT: inputs}  # new output tensor by teacher layer name

    def call(node, args, kwargs):
        layer = node.operation
        block = owner.get(layer.name)
        if block is None:
            new = copy_layer(layer) if isinstance(layer, keras.layers.Layer) else layer
            outputs[layer.name] = new(*args, **kwargs)
        elif block.output_boundary not in outputs:
            # The block's input precedes all its layers in the teacher's order, so it is
            # already built; the block's inner tensors are used only inside the block, so
            # whatever the replay computes from them is never part of the result.
            outputs[block.output_boundary] = make_block(block, outputs[block.input_boundary])
        if block is not None and layer.name != block.output_boundary:
            return _placeholder(node)
        return outputs[layer.name if block is None else block.output_boundary]

    result = replay(teacher, [inputs], call)
    model = keras.Model(inputs, result[0], name=f"{teacher.name}_student")
    if tensors is not None:
        tensors.update(outputs)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(weights[layer.name])
    return refresh_state(model)


def _placeholder(node):
    """Stand-in for a tensor inside a replaced block: nothing outside the block reads it."""
    return [keras.KerasTensor(t.shape, dtype=t.dtype) for t in node.outputs]


def copy_block(teacher, block: Block, tensor):
    """The teacher block's own layers, copied, applied to `tensor` (for the proof that the
    rewrite is exact: a teacher with every block replaced by its copy is the teacher, and
    for timing the teacher's block as a candidate). Its bare keras.ops calls (ConvNeXt's
    `x + y`, MobileNetV3's hard sigmoid), which are no layers, are called again as they
    are: they hold no weights."""
    teacher = flatten_model(teacher)
    inside = set(block.layers)
    outputs = {block.input_boundary: tensor}
    for node in graph_nodes(teacher):
        operation = node.operation
        if operation.name not in inside:
            continue
        parents = {id(t): outputs[_producer(t)] for t in node.input_tensors}
        args, kwargs = node.arguments.fill_in(parents)
        call = copy_layer(operation) if isinstance(operation, keras.layers.Layer) else operation
        outputs[operation.name] = call(*args, **kwargs)
    return outputs[block.output_boundary]


def _producer(tensor) -> str:
    operation = tensor._keras_history.operation
    return MODEL_INPUT if isinstance(operation, keras.layers.InputLayer) else operation.name


def assemble_student(teacher, blocks: list[Block], block_weights: dict[str, dict],
                     depth_multiplier: int | dict[str, int] = 1,
                     tensors: dict | None = None) -> keras.Model:
    """The student: blocks with trained weights in `block_weights` are replaced by their
    students; blocks without stay the teacher's. `depth_multiplier`: one for every block,
    or {block name: multiplier} (a block retrained wider by acceptance, distill/accept.py)."""
    weights = layer_weights(flatten_model(teacher))
    for per_layer in block_weights.values():
        weights.update(per_layer)
    replaced = [block for block in blocks if block.name in block_weights]

    def multiplier(block) -> int:
        if isinstance(depth_multiplier, dict):
            return depth_multiplier[block.name]
        return depth_multiplier

    return rewrite(teacher, replaced,
                   lambda block, tensor: apply_student(block, tensor, multiplier(block)),
                   weights, tensors)


def stitch_student(teacher, blocks, weights: dict, multipliers: dict, x_calibrate, path):
    """The assembled student, its BN statistics re-estimated on training images (no weight
    is trained), saved to `path` for the workers and the final evaluation."""
    student = assemble_student(teacher, blocks, weights, multipliers)
    recalibrate_batchnorm(student, x_calibrate)
    save_model_atomically(student, path)
    return student
