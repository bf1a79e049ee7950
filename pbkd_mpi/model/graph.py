"""Blocks of a teacher's layer graph, at the granularity the job asks for.

The teacher is read as a DAG of layers (a Functional or Sequential model; models nested
inside it are flattened first). A *cut point* is a layer output through which every path
from the input to the output passes. Three granularities:

- `layer`: each full Conv2D or Conv1D, SeparableConv2D or SeparableConv1D, or Dense on
  feature maps or sequences (a 1x1 conv) with
  the BN and activation layers right after it (a conv group), wherever its inner tensors
  feed nothing else, also inside residual branches;
- `block`: the segments between consecutive cut points (a residual block with its skip
  connection, a DenseNet conv block with its concatenation), each with the element-wise
  layers right after it;
- `stage`: consecutive `block` segments merged while the spatial size stays the same.

A block is described by plain data (names, shapes, counts), so it can be printed, sent to
another rank and written to the report without carrying Keras objects along.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import keras
import numpy as np

from pbkd_mpi.errors import UserError
from pbkd_mpi.model.cost import layers_cost, shapes_only

MODEL_INPUT = "__input__"  # boundary name of the model's input tensor
GRANULARITIES = ("layer", "block", "stage")

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
    kernel_size: tuple[int, ...]  # one entry per spatial axis: two for images, one for sequences
    strides: tuple[int, ...]
    padding: str
    dilation_rate: tuple[int, ...]
    final_activation: str  # "linear" when the block ends before any activation
    teacher_params: int
    teacher_flops: int
    # "conv": one conv group (the student starts from its factorised kernel); "segment":
    # several layers, possibly with skip connections (the student is a separable stack).
    kind: str = "conv"
    # Channels inside the student: the teacher block's narrowest conv (a conv group: the
    # smaller of its input and output channels), times the job's width multiplier.
    width: int = 0
    convs: int = 1  # full and separable convs in the teacher block
    repeats: int = 1  # a stage: how many conv segments it merges (the student repeats as many)
    family: str = "separable"  # the student family, one of students.FAMILIES

    def to_dict(self) -> dict:
        return asdict(self)


_FULL_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D)
_SEPARABLE_CONVS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE_CONVS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_PADDINGS = (keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D)


def is_full_conv(layer) -> bool:
    """A full Conv1D or Conv2D: depthwise, separable and transposed convs are already cheap
    or differ."""
    return isinstance(layer, _FULL_CONVS) and not isinstance(
        layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                *_DEPTHWISE_CONVS, *_SEPARABLE_CONVS))


def is_conv_layer(layer) -> bool:
    """A layer that starts a block: a full conv; a separable conv (Xception's and
    NASNet's), whose pointwise half a dense low-rank student can shrink; a Dense layer on
    feature maps or sequences, which is a 1x1 conv (ConvNeXt's pointwise layers), not a
    classifier."""
    if isinstance(layer, keras.layers.Dense):
        return len(layer.input.shape) in (3, 4)
    return is_full_conv(layer) or isinstance(layer, _SEPARABLE_CONVS)


def _out_channels(layer) -> int:
    return int(layer.units if isinstance(layer, keras.layers.Dense) else layer.filters)


def check_graph_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise UserError(f"The teacher must be a keras.Model, received {type(model).__name__}.")
    if not _is_graph_model(model):
        raise UserError(
            f"The teacher is a subclassed model ({type(model).__name__}) with no layer graph "
            f"to cut into blocks. Rebuild it with the Functional API or keras.Sequential "
            f"(same layers, same weights) and save that as .keras."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(
            f"The teacher must have one input and one output, received {len(model.inputs)} "
            f"inputs and {len(model.outputs)} outputs."
        )


def _is_graph_model(model) -> bool:
    return isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"


def _functional(model):
    """The Functional graph behind a model (a Sequential keeps one once it is built)."""
    if isinstance(model, keras.Sequential):
        inner = getattr(model, "_functional", None)
        if inner is None:
            raise UserError(
                f"The Sequential model {model.name!r} has no input shape, so it has no graph "
                f"yet; start it with keras.Input(shape) and save it again."
            )
        return inner
    return model


def graph_nodes(model):
    """The model's call nodes (not its inputs) in an order that runs them correctly."""
    graph = _functional(model)
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                yield node


def boundary_tensor(model, name: str):
    """The tensor a block boundary names: the model's input (MODEL_INPUT), or the output of
    the layer, or of the bare keras.ops call (ConvNeXt's `x + y`, which is no layer, so
    get_layer cannot find it), called `name`."""
    if name == MODEL_INPUT:
        return model.inputs[0]
    for node in graph_nodes(model):
        if node.operation.name == name:
            return node.outputs[0]
    raise ValueError(f"The model {model.name!r} has no layer or operation named {name!r}.")


def replay(model, inputs, call):
    """Run the model's graph on new symbolic `inputs`, calling `call(node, args, kwargs)`
    for each node; returns the new output tensors. Nested models are entered, so `call`
    only ever sees plain layers."""
    graph = _functional(model)
    tensors = {id(old): new for old, new in zip(graph.inputs, inputs)}
    for node in graph_nodes(graph):
        args, kwargs = node.arguments.fill_in(tensors)
        if isinstance(node.operation, keras.Model):
            if not _is_graph_model(node.operation):
                check_graph_model(node.operation)  # raises the advice for subclassed models
            outputs = replay(node.operation, keras.tree.flatten((args, kwargs)), call)
        else:
            outputs = keras.tree.flatten(call(node, args, kwargs))
        for old, new in zip(node.outputs, outputs):
            tensors[id(old)] = new
    return [tensors[id(old)] for old in graph.outputs]


def copy_layer(layer):
    """A new layer with the same configuration, unbuilt: the caller sets the weights once
    the layer is called (built)."""
    return layer.__class__.from_config(layer.get_config())


def has_nested_models(model) -> bool:
    return any(isinstance(layer, keras.Model) for layer in _functional(model).layers)


def flatten_model(model, weights: bool = True):
    """One flat Functional model computing the same as `model`, with nested models (a
    backbone used as a layer) dissolved into their layers, so that every layer, nested or
    not, is reachable by `get_layer(name)` and has exactly one output tensor there.
    The layers are copies carrying the same weights (`weights=False`: the graph alone,
    built inside cost.shapes_only); a model without nested models is returned as it is."""
    check_graph_model(model)
    if not has_nested_models(model):
        return model
    return copied_graph(model, weights=weights)


def copied_graph(model, copy=copy_layer, skip=frozenset(), weights: bool = True):
    """A flat Functional copy of `model`: each layer replaced by `copy(layer)` (carrying
    its weights unless `weights` is False), the layers named in `skip` left out (their
    input passed on), bare keras.ops calls replayed as they are."""
    copies = {}

    def call(node, args, kwargs):
        layer = node.operation
        if layer.name in copies:
            raise UserError(
                f"Layer name {layer.name!r} occurs twice in the teacher once its nested models "
                f"are flattened (a layer shared between two calls, or two nested models with "
                f"equally named layers); give every layer a unique name and save it again."
            )
        if layer.name in skip:
            return args[0]
        if not isinstance(layer, keras.layers.Layer):
            return layer(*args, **kwargs)  # a stateless keras.ops call
        copies[layer.name] = (layer, copy(layer))
        return copies[layer.name][1](*args, **kwargs)

    source = model.inputs[0]
    inputs = keras.Input(source.shape[1:], dtype=source.dtype, name=source.name)
    outputs = replay(model, [inputs], call)
    flat = keras.Model(inputs, outputs[0], name=model.name)
    for original, new in copies.values() if weights else ():
        new.set_weights(original.get_weights())
    return refresh_state(flat) if weights else flat


def refresh_state(model):
    """`model` with the state its layers derive from their weights brought up to date,
    after its weights were set on newly built layers: an adapted Normalization computes
    with a copy of its mean and variance taken when Keras finalises it (at adapt or load),
    not with its weights, so a copy given the weights normalised with 0 and 1 (a teacher's
    first layer off by 250 on 0-255 pixels). Returns `model`."""
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, keras.layers.Normalization) and layer.built:
            layer.finalize_state()
    return model


# --- the layer DAG ----------------------------------------------------------------------


@dataclass
class _Graph:
    """The flat teacher as a DAG: layers in topological order and who feeds whom."""

    model: object
    order: list  # layer names, topological
    layers: dict  # name -> layer
    parents: dict  # name -> input layer names (MODEL_INPUT for the model input)
    children: dict  # name (or MODEL_INPUT) -> consuming layer names
    output: str  # the layer producing the model output


def _layer_graph(model) -> _Graph:
    check_graph_model(model)
    if has_nested_models(model):
        with shapes_only():  # blocks are plain data: the graph needs no weights
            model = flatten_model(model, weights=False)
    graph = _Graph(model, [], {}, {}, {MODEL_INPUT: []}, "")
    input_id = id(model.inputs[0])
    for node in graph_nodes(model):
        layer = node.operation
        if layer.name in graph.layers:
            raise UserError(
                f"Layer {layer.name!r} of the teacher is called more than once; shared layers "
                f"cannot be cut into blocks. Use a separate layer for each call."
            )
        if len(node.outputs) != 1:
            raise UserError(
                f"Layer {layer.name!r} of the teacher has {len(node.outputs)} outputs; only "
                f"layers with one output tensor are supported."
            )
        parents = [MODEL_INPUT if id(t) == input_id else t._keras_history.operation.name
                   for t in node.input_tensors]
        graph.order.append(layer.name)
        graph.layers[layer.name] = layer
        graph.parents[layer.name] = parents
        graph.children[layer.name] = []
        for parent in dict.fromkeys(parents):
            graph.children[parent].append(layer.name)
    graph.output = model.outputs[0]._keras_history.operation.name
    return graph


def cut_points(graph: _Graph) -> list[str]:
    """Layers whose output every path from input to output passes, in order.

    In a topological order, position i is a cut point when no edge jumps over it: every
    tensor produced before i is consumed at or before i. Layers that do not lead to the
    output would make every later position look open, so they are left out first.
    """
    useful = _ancestors(graph, graph.output)
    position = {name: i for i, name in enumerate(n for n in graph.order if n in useful)}

    def reach_of(name):  # the furthest position that consumes this tensor
        return max((position[c] for c in graph.children[name] if c in position), default=-1)

    reach, cuts = reach_of(MODEL_INPUT), []
    for name, i in position.items():
        if reach <= i:  # nothing made before `name` is needed after it
            cuts.append(name)
        reach = max(reach, reach_of(name))
    return cuts


def _ancestors(graph: _Graph, name: str) -> set:
    seen, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current in seen or current == MODEL_INPUT:
            continue
        seen.add(current)
        stack.extend(graph.parents[current])
    return seen


# --- blocks --------------------------------------------------------------------------


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
    if isinstance(layer, keras.layers.Activation) or is_conv_layer(layer):
        name = keras.activations.serialize(layer.activation)
        return name if isinstance(name, str) else name.get("config", {}).get("name", "linear")
    return None


def _final_activation(layers) -> str:
    """How a run of layers ends: the last activation, unless an affine layer (BN) or a
    merge (Add, Concatenate) comes after it, which leaves the output pre-activation."""
    final = "linear"
    for layer in layers:
        name = _activation_name(layer)
        if name is not None and name != "linear":
            final = name
        elif not isinstance(layer, keras.layers.Dropout):
            final = "linear"
    return final


def _follower_run(graph: _Graph, last: str) -> list[str]:
    """The element-wise layers that follow `last` one after the other, each the only
    consumer of the tensor before it."""
    run = []
    while len(graph.children.get(last, [])) == 1:
        child = graph.children[last][0]
        if not isinstance(graph.layers[child], _FOLLOWERS) or len(graph.parents[child]) != 1:
            break
        run.append(child)
        last = child
    return run


def _conv_groups(graph: _Graph) -> list[list[str]]:
    groups = []
    for name in graph.order:
        if is_conv_layer(graph.layers[name]):
            groups.append([name, *_follower_run(graph, name)])
    return groups


def _segments(graph: _Graph) -> list[list[str]]:
    """The layers between consecutive cut points, each with the element-wise layers
    after it (a conv's BN and ReLU, the ReLU after a residual Add)."""
    cuts = cut_points(graph)
    needed = _ancestors(graph, graph.output)
    useful = [n for n in graph.order if n in needed]
    segments, current = [], []
    for name in useful:
        current.append(name)
        if name in cuts:
            segments.append(current)
            current = []
    merged = []
    for segment in segments:
        if (merged and len(segment) == 1 and isinstance(graph.layers[segment[0]], _FOLLOWERS)
                and _has_conv(graph, merged[-1])):
            merged[-1] = merged[-1] + segment
        else:
            merged.append(segment)
    return _bind_depthwise(graph, merged)


def _is_depthwise_only(graph: _Graph, names) -> bool:
    kinds = [graph.layers[n] for n in names]
    return (any(isinstance(k, _DEPTHWISE_CONVS) for k in kinds)
            and not any(is_full_conv(k) for k in kinds))


def _bind_depthwise(graph: _Graph, segments) -> list[list[str]]:
    """A depthwise conv cannot be a block alone (nothing cheaper replaces it), and in a
    chain it is a cut point of its own. Join it to the convs around it as MobileNet's
    blocks do: back over padding to a 1x1 expansion ending in an activation, forward to
    the next full conv (the projection) and its BN, so that the inverted-residual blocks
    without a skip connection become blocks too."""
    result, pending = [], None
    for segment in segments:
        if pending is not None:
            pending = pending + segment
            if _has_conv(graph, segment):
                result.append(pending)
                pending = None
            continue
        if not _is_depthwise_only(graph, segment):
            result.append(segment)
            continue
        pending = segment
        while result and all(isinstance(graph.layers[n], _PADDINGS)
                             for n in result[-1]):
            pending = result.pop() + pending
        if result and _is_expansion(graph, result[-1]):
            pending = result.pop() + pending
    if pending is not None:
        result.append(pending)
    return result


def _is_expansion(graph: _Graph, names) -> bool:
    first = graph.layers[names[0]]
    return (is_full_conv(first) and set(first.kernel_size) == {1}
            and _final_activation([graph.layers[n] for n in names]) != "linear")


def _has_conv(graph: _Graph, names) -> bool:
    return any(is_conv_layer(graph.layers[n]) and graph.layers[n].trainable for n in names)


def _spatial(graph: _Graph, name: str) -> tuple:
    tensor = graph.model.inputs[0] if name == MODEL_INPUT else graph.layers[name].output
    return tuple(tensor.shape[1:-1])


def _stages(graph: _Graph, segments) -> list[tuple[list[str], int]]:
    """Consecutive conv segments merged while the spatial size stays the same; a segment
    that changes it (a strided first block) starts a new stage, and a segment without a
    conv (padding, pooling) stays outside any stage. Each stage comes with the number of
    segments it merges."""
    stages, current, count = [], [], 0
    for segment in segments:
        if not _has_conv(graph, segment):
            if current:
                stages.append((current, count))
            stages.append((segment, 1))
            current, count = [], 0
            continue
        source = graph.parents[segment[0]][0]
        if current and _spatial(graph, source) != _spatial(graph, segment[-1]):
            stages.append((current, count))
            current, count = [], 0
        current, count = current + segment, count + 1
    if current:
        stages.append((current, count))
    return stages


def _block_input(graph: _Graph, names) -> str | None:
    """The one tensor (layer name or MODEL_INPUT) feeding this set of layers from outside,
    or None when several do or an inner tensor is used outside the set."""
    inside = set(names)
    sources = {p for n in names for p in graph.parents[n] if p not in inside}
    if len(sources) != 1:
        return None
    for name in names[:-1]:
        if any(child not in inside for child in graph.children[name]):
            return None
    return sources.pop()


_RESHAPING = (keras.layers.Reshape, keras.layers.Dropout, keras.layers.Activation,
              keras.layers.Flatten)
_GLOBAL_POOLS = (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalMaxPooling1D,
                 keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


def _pooled(graph: _Graph, source: str) -> bool:
    """Whether a block's input is globally pooled features (through reshapes): the block
    is a classifier written as a 1x1 conv (MobileNet's) or a squeeze-and-excitation gate,
    dense layers that stay the teacher's."""
    while source != MODEL_INPUT:
        layer = graph.layers[source]
        if isinstance(layer, _GLOBAL_POOLS):
            return True
        if not isinstance(layer, _RESHAPING) or len(graph.parents[source]) != 1:
            return False
        source = graph.parents[source][0]
    return False


def _make_block(graph: _Graph, names, source: str, repeats: int = 1) -> Block | None:
    members = [graph.layers[n] for n in names]
    convs = [m for m in members if is_conv_layer(m)]
    in_tensor = graph.model.inputs[0] if source == MODEL_INPUT else graph.layers[source].output
    input_shape = tuple(int(d) for d in in_tensor.shape[1:])
    output_shape = tuple(int(d) for d in members[-1].output.shape[1:])
    params, flops = layers_cost(members)
    common = dict(
        layers=tuple(names), input_boundary=source, output_boundary=names[-1],
        input_shape=input_shape, output_shape=output_shape,
        final_activation=_final_activation(members), teacher_params=params,
        teacher_flops=flops,
    )
    ones = (1,) * (len(input_shape) - 1)  # per spatial axis
    if len(convs) == 1 and members[0] is convs[0] and all(
            isinstance(m, _FOLLOWERS) for m in members[1:]):
        conv = convs[0]
        return Block(name=conv.name, kernel_size=tuple(getattr(conv, "kernel_size", ones)),
                     strides=tuple(getattr(conv, "strides", ones)),
                     padding=getattr(conv, "padding", "valid"),
                     dilation_rate=tuple(getattr(conv, "dilation_rate", ones)),
                     width=min(input_shape[-1], output_shape[-1]), **common)
    strides = _overall_strides(input_shape, output_shape)
    if strides is None:
        return None  # the student's same-padded stack cannot reproduce this shape
    return Block(name=names[-1], kernel_size=(3,) * len(ones), strides=strides, padding="same",
                 dilation_rate=ones, kind="segment", convs=len(convs), repeats=repeats,
                 width=min(_out_channels(c) for c in convs), **common)


def _overall_strides(input_shape, output_shape) -> tuple[int, ...] | None:
    """The stride a same-padded conv needs to turn the input's spatial size into the
    output's, or None when no integer stride does."""
    strides = []
    for size_in, size_out in zip(input_shape[:-1], output_shape[:-1]):
        stride = max(1, round(size_in / size_out))
        if math.ceil(size_in / stride) != size_out:
            return None
        strides.append(stride)
    return tuple(strides) if len(strides) in (1, 2) else None


def find_blocks(model, granularity="layer") -> list[Block]:
    """The blocks of a teacher. `granularity` is "layer", "block", "stage", or a list of
    (first layer name, last layer name) pairs; only blocks with a trainable full or
    separable conv and one input and one output tensor are returned."""
    graph = _layer_graph(model)
    if isinstance(granularity, str):
        if granularity not in GRANULARITIES:
            raise UserError(
                f"Expected a granularity among {', '.join(GRANULARITIES)} or a list of "
                f"[first, last] layer-name pairs, received {granularity!r}."
            )
        if granularity == "layer":
            candidates = [(names, 1) for names in _conv_groups(graph)]
        elif granularity == "block":
            candidates = [(names, 1) for names in _segments(graph)]
        else:
            candidates = _stages(graph, _segments(graph))
        blocks = []
        for names, repeats in candidates:
            source = _block_input(graph, names)
            if source is not None and _has_conv(graph, names) and not _pooled(graph, source):
                block = _make_block(graph, names, source, repeats)
                if block is not None:
                    blocks.append(block)
    else:
        blocks = [_explicit_block(graph, pair) for pair in granularity]
    if not blocks:
        raise UserError(
            f"The teacher {graph.model.name!r} has no Conv2D, Conv1D or separable conv layer "
            f"that can be cut out as a block with one input and one output, so there is no "
            f"block to distill."
        )
    return blocks


def _explicit_block(graph: _Graph, pair) -> Block:
    if len(pair) != 2 or not all(isinstance(n, str) for n in pair):
        raise UserError(f"Expected a [first, last] pair of layer names, received {pair!r}.")
    first, last = pair
    for name in pair:
        if name not in graph.layers:
            raise UserError(f"Block [{first!r}, {last!r}]: the teacher has no layer {name!r}.")
    # The block is every layer on a path from `first` to `last`.
    between = _ancestors(graph, last) - (_ancestors(graph, first) - {first})
    names = [n for n in graph.order if n in between]
    source = _block_input(graph, names)
    if source is None or names[0] != first:
        raise UserError(
            f"Block [{first!r}, {last!r}] must have one input tensor and one output tensor; "
            f"the layers from {first!r} to {last!r} take several inputs or feed layers "
            f"outside the block."
        )
    if not _has_conv(graph, names):
        raise UserError(f"Block [{first!r}, {last!r}] has no trainable conv to distill.")
    block = _make_block(graph, names, source)
    if block is None:
        raise UserError(
            f"Block [{first!r}, {last!r}] maps spatial size {_spatial(graph, source)} to "
            f"{_spatial(graph, last)}, which no integer stride reproduces."
        )
    return block


def boundaries(blocks) -> list[str]:
    """The tensors the cache must hold: each block's input and output, once each."""
    seen = []
    for block in blocks:
        for name in (block.input_boundary, block.output_boundary):
            if name not in seen:
                seen.append(name)
    return seen


# Identities at inference, whatever their rate (EfficientNet's dropout grows block by block).
_INFERENCE_IDENTITIES = (keras.layers.Dropout, keras.layers.GaussianNoise,
                         keras.layers.GaussianDropout, keras.layers.AlphaDropout,
                         keras.layers.ActivityRegularization)


def block_structures(model, blocks) -> dict[str, str]:
    """{block name: its computation without its names}: the block's input shape and, per
    operation in order, its class, its configuration less its name, and its arguments with
    each tensor replaced by the position in the block of the operation that makes it (-1:
    the block's input). Blocks of equal structure run alike on inputs of that shape, their
    weights aside (a stage's repeated blocks, a NAS cell's separable convs); layers that
    are identities at inference (dropout, noise) count by their class alone. `model`: the
    flat teacher the blocks were found in."""
    nodes = {node.operation.name: node for node in graph_nodes(model)}
    input_id = id(model.inputs[0])
    structures = {}
    for block in blocks:
        position = {block.input_boundary: -1}

        def reference(value):
            if not isinstance(value, keras.KerasTensor):
                return value
            if id(value) == input_id:
                return {"tensor": position[MODEL_INPUT]}
            return {"tensor": position[value._keras_history.operation.name]}

        operations = []
        for index, name in enumerate(block.layers):
            node = nodes[name]
            operation = node.operation
            try:
                config = ({} if isinstance(operation, _INFERENCE_IDENTITIES) else
                          {k: v for k, v in operation.get_config().items() if k != "name"})
            except Exception:  # an operation that cannot describe itself: unique
                config = {"unique": f"{block.name}/{name}"}
            arguments = keras.tree.map_structure(
                reference, (list(node.arguments.args), dict(node.arguments.kwargs)))
            operations.append([type(operation).__module__, type(operation).__qualname__,
                               config, arguments])
            position[name] = index
        structures[block.name] = json.dumps([list(block.input_shape), operations],
                                            sort_keys=True, default=_plain)
    return structures


def _plain(value):
    """A JSON stand-in for a value of a configuration that JSON lacks."""
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, np.ndarray):  # a constant (Normalization's mean): its digest
        return ["array", list(value.shape), str(value.dtype),
                hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()]
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)  # an object: equal only where its text is (an address: never)
