"""Student blocks: depthwise-separable replacements with the teacher block's shapes and ending.

A conv group (kind "conv"): depthwise kxk (the teacher's stride, padding and dilation) ->
pointwise 1x1 to the teacher's channels -> BN -> the teacher block's final activation (none
when the teacher block ends pre-activation).

A multi-layer segment (kind "segment", e.g. a residual block): two separable units, the
first carrying the segment's overall stride and going to the teacher's narrowest conv
width, the second to the segment's output channels; when the segment keeps its input
shape, the stack is a residual branch added to the input, as in the teacher. Then the
teacher block's final activation.

The `low_rank` family is dense: a conv group becomes the teacher's kxk conv to r channels
then a 1x1 conv to the output channels (+ BN, activation), started from the rank-r SVD of
the teacher's kernel; a segment becomes a plain pair (3x3 conv to r channels, BN, ReLU,
1x1 conv, BN, the skip connection where the shapes match). Its rank follows a parameter
ratio, so it also replaces what a separable student cannot shrink (1x1 convs, the
pointwise halves of depthwise networks).

Layer names derive from the block's name, so the weights trained on a worker find their
layers in the assembled student by name.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from dataclasses import replace

import keras
import numpy as np

from pbkd_mpi.config import STUDENT_FAMILIES
from pbkd_mpi.model.cost import layers_cost, shapes_only
from pbkd_mpi.model.graph import Block


# Keras' default 0.99 needs hundreds of steps before the moving statistics that inference
# uses catch up; a block task may run only a few hundred steps in all.
BN_MOMENTUM = 0.9


def make_activation(name: str, layer_name: str, rank: int = 2):
    """A layer applying a final activation named as graph.find_blocks names them; `rank`
    is the number of spatial axes (2 for images, 1 for sequences)."""
    match = re.fullmatch(r"(leaky_relu|relu_max)\(([-0-9.e]+)\)", name)
    if match:
        value = float(match.group(2))
        if match.group(1) == "leaky_relu":
            return keras.layers.LeakyReLU(negative_slope=value, name=layer_name)
        return keras.layers.ReLU(max_value=value, name=layer_name)
    if name == "relu":
        return keras.layers.ReLU(name=layer_name)
    if name == "prelu":
        return keras.layers.PReLU(shared_axes=list(range(1, rank + 1)), name=layer_name)
    if name == "elu":
        return keras.layers.ELU(name=layer_name)
    return keras.layers.Activation(name, name=layer_name)


def spatial_rank(block: Block) -> int:
    """Spatial axes of the block's tensors: 2 for images, 1 for sequences."""
    return len(block.input_shape) - 1


def _conv(rank: int, filters: int, kernel_size, **options):
    layer = keras.layers.Conv1D if rank == 1 else keras.layers.Conv2D
    return layer(filters, kernel_size, use_bias=False, **options)


def _depthwise(rank: int, kernel_size, **options):
    layer = keras.layers.DepthwiseConv1D if rank == 1 else keras.layers.DepthwiseConv2D
    return layer(kernel_size, use_bias=False, **options)


def _norm(name: str):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)


def _finish(block: Block, tensor, name: str):
    """The teacher block's final activation, if it has one."""
    if block.final_activation == "linear":
        return tensor
    return make_activation(block.final_activation, name, spatial_rank(block))(tensor)


def apply_separable_student(block: Block, tensor, depth_multiplier: int = 1):
    """The separable student of a conv group: depthwise kxk -> pointwise 1x1 -> BN -> the
    block's final activation. With a depth multiplier m > 1 the input is tiled m times and
    the depthwise conv has one filter per channel: the function and parameters of Keras'
    `depth_multiplier=m`, on the depthwise kernels XNNPACK and oneDNN run fast (a
    multiplier above 1 takes their generic grouped path: 2x slower in TFLite on the
    demo's blocks, docs/usage.md)."""
    prefix, rank = f"{block.name}_student", spatial_rank(block)
    if depth_multiplier > 1:
        tensor = keras.layers.Concatenate(name=f"{prefix}_tile")([tensor] * depth_multiplier)
    x = _depthwise(rank, block.kernel_size, strides=block.strides, padding=block.padding,
                   dilation_rate=block.dilation_rate, name=f"{prefix}_dw")(tensor)
    x = _norm(f"{prefix}_bn")(_conv(rank, block.output_shape[-1], 1, name=f"{prefix}_pw")(x))
    return _finish(block, x, f"{prefix}_act")


def _separable_unit(prefix, tensor, channels, strides, activation):
    spatial = len(tensor.shape) - 2
    tensor = _depthwise(spatial, 3, strides=strides, padding="same",
                        name=f"{prefix}_dw")(tensor)
    tensor = _conv(spatial, channels, 1, name=f"{prefix}_pw")(tensor)
    tensor = _norm(f"{prefix}_bn")(tensor)
    if activation != "linear":
        tensor = make_activation(activation, f"{prefix}_act", spatial)(tensor)
    return tensor


def _plain_pair(prefix, tensor, rank, channels, strides):
    """A 3x3 conv to `rank` channels, BN, ReLU, a 1x1 conv to `channels`, BN."""
    spatial = len(tensor.shape) - 2
    x = _conv(spatial, rank, 3, strides=strides, padding="same", name=f"{prefix}_reduce")(tensor)
    x = keras.layers.ReLU(name=f"{prefix}_reduce_act")(_norm(f"{prefix}_reduce_bn")(x))
    x = _conv(spatial, channels, 1, name=f"{prefix}_pw")(x)
    return _norm(f"{prefix}_bn")(x)


def _residual_stack(block: Block, tensor, pair, first_prefix: str):
    """A multi-layer block's student: `pair(prefix, tensor, strides)` carrying the block's
    stride, added to the input when the shapes match, then the final activation; a stage
    of several teacher blocks gets one more residual pair per further block, at the
    output's shape, so the student's depth follows the stage's."""
    prefix = f"{block.name}_student"
    out = pair(first_prefix, tensor, block.strides)
    if tuple(block.input_shape) == tuple(block.output_shape):
        out = keras.layers.Add(name=f"{prefix}_add")([tensor, out])
    out = _finish(block, out, f"{prefix}_act")
    for repeat in range(2, block.repeats + 1):
        inner = f"{prefix}_r{repeat}"
        step = pair(inner, out, (1,) * spatial_rank(block))
        out = _finish(block, keras.layers.Add(name=f"{inner}_add")([out, step]), f"{inner}_act")
    return out


def apply_segment_student(block: Block, tensor):
    """The separable student of a multi-layer segment applied to `tensor`: two separable
    units, to the block's width then to its output channels. The depthwise parts keep a
    multiplier of 1: the segment's own width, not the multiplier, sets its capacity."""
    ones = (1,) * spatial_rank(block)

    def pair(prefix, x, strides):
        hidden = _separable_unit(f"{prefix}_1", x, block.width, strides, "relu")
        return _separable_unit(f"{prefix}_2", hidden, block.output_shape[-1], ones, "linear")

    return _residual_stack(block, tensor, pair, f"{block.name}_student")


def apply_inverted_residual_student(block: Block, tensor):
    """MobileNetV2-style: 1x1 to `block.width` channels -> BN -> ReLU -> depthwise with
    the block's stride -> BN -> ReLU -> linear 1x1 projection to the output channels -> BN,
    added to the input when the shapes match, then the block's final activation."""
    prefix, rank = f"{block.name}_student", spatial_rank(block)
    if block.kind == "conv":
        dw_args = dict(kernel_size=block.kernel_size, strides=block.strides,
                       padding=block.padding, dilation_rate=block.dilation_rate)
    else:
        dw_args = dict(kernel_size=3, strides=block.strides, padding="same")
    x = _conv(rank, block.width, 1, name=f"{prefix}_expand")(tensor)
    x = keras.layers.ReLU(name=f"{prefix}_expand_act")(_norm(f"{prefix}_expand_bn")(x))
    x = _depthwise(rank, name=f"{prefix}_dw", **dw_args)(x)
    x = keras.layers.ReLU(name=f"{prefix}_dw_act")(_norm(f"{prefix}_dw_bn")(x))
    x = _conv(rank, block.output_shape[-1], 1, name=f"{prefix}_project")(x)
    x = _norm(f"{prefix}_bn")(x)
    if tuple(block.input_shape) == tuple(block.output_shape):
        x = keras.layers.Add(name=f"{prefix}_add")([tensor, x])
    return _finish(block, x, f"{prefix}_act")


def apply_low_rank_student(block: Block, tensor, depth_multiplier: int = 1):
    """The dense low-rank student; its rank is `block.width` times the depth multiplier,
    so that acceptance's wider retrain widens it as it widens the separable family."""
    prefix, spatial = f"{block.name}_student", spatial_rank(block)
    rank = block.width * depth_multiplier
    if block.kind == "conv":
        x = _conv(spatial, rank, block.kernel_size, strides=block.strides,
                  padding=block.padding, dilation_rate=block.dilation_rate,
                  name=f"{prefix}_reduce")(tensor)
        x = _conv(spatial, block.output_shape[-1], 1, name=f"{prefix}_pw")(x)
        return _finish(block, _norm(f"{prefix}_bn")(x), f"{prefix}_act")

    def pair(name, x, strides):
        return _plain_pair(name, x, rank, block.output_shape[-1], strides)

    return _residual_stack(block, tensor, pair, f"{prefix}_1")


FAMILIES = STUDENT_FAMILIES
# The low-rank student's parameters over its block's when no target says otherwise: about
# what the separable student of a 3x3 conv costs at the default depth multiplier.
LOW_RANK_RATIO = 0.25


def apply_student(block: Block, tensor, depth_multiplier: int = 1):
    """The block's student, fresh layers, applied to `tensor`."""
    if block.family == "inverted_residual":
        return apply_inverted_residual_student(block, tensor)
    if block.family == "low_rank":
        return apply_low_rank_student(block, tensor, depth_multiplier)
    if block.family != "separable":
        raise ValueError(f"Expected a student family among {FAMILIES}, received "
                         f"{block.family!r} for block {block.name!r}.")
    if block.kind == "segment":
        return apply_segment_student(block, tensor)
    return apply_separable_student(block, tensor, depth_multiplier)


def family_for(name: str, default: str, overrides=()) -> str:
    """The family of the block called `name`: the first `"pattern=family"` override whose
    shell-style pattern matches the name, else `default`."""
    for item in overrides:
        pattern, _, family = item.partition("=")
        if fnmatch.fnmatchcase(name, pattern.strip()):
            return family.strip()
    return default


def with_family(block: Block, family: str = "separable", width_multiplier: float = 1.0,
                depth_multiplier: int = 1, target: float | None = None) -> Block:
    """The block with the job's student family and internal width.

    `target` (student.target_params) is the student's parameters over the block's; a family
    whose width sets its size gets the width that meets it; a single separable conv, whose
    size the depth multiplier alone sets, becomes low-rank. Without a target a low-rank
    student gets LOW_RANK_RATIO and the others the teacher's narrowest conv width times
    `width_multiplier`.
    """
    if family not in FAMILIES:
        raise ValueError(f"Expected a student family among {FAMILIES}, received {family!r}.")
    block = replace(block, family=family, width=max(1, round(block.width * width_multiplier)))
    if family == "low_rank":
        return sized(block, target or LOW_RANK_RATIO, depth_multiplier)
    if target is None:
        return block
    fitted = sized(block, target, depth_multiplier)
    if fitted is block:  # a single separable conv: only the low-rank form can meet a target
        return sized(replace(block, family="low_rank"), target, depth_multiplier)
    return fitted


def sized(block: Block, ratio: float, depth_multiplier: int = 1,
          at_most: bool = False) -> Block:
    """The block with the width whose student has about (`at_most`: at most, unless even
    width 1 has more) `ratio` of the block's parameters. Every family's parameters are
    affine in its width, so two builds find it; a student whose width does not change its
    size is returned as it is."""
    one = student_cost(replace(block, width=1), depth_multiplier)[0]
    two = student_cost(replace(block, width=2), depth_multiplier)[0]
    if two <= one:
        return block
    width = 1 + (ratio * block.teacher_params - one) / (two - one)
    return replace(block, width=max(1, math.floor(width + 1e-9) if at_most else round(width)))


def build_student_model(block: Block, depth_multiplier: int = 1) -> keras.Model:
    """The student block as a standalone model from block input to block output."""
    inputs = keras.Input(block.input_shape, name=f"{block.name}_input")
    outputs = apply_student(block, inputs, depth_multiplier)
    if tuple(outputs.shape[1:]) != tuple(block.output_shape):
        raise ValueError(
            f"Student of block {block.name!r} produces shape {tuple(outputs.shape[1:])}, "
            f"expected the teacher block's {block.output_shape}."
        )
    return keras.Model(inputs, outputs, name=f"{block.name}_student")


def initial_weights(block: Block, teacher, depth_multiplier: int = 1) -> dict[str, list]:
    """Start the student at the best approximation of the teacher block that it can hold.

    Separable: for each input channel, the teacher's kxk x C_out kernel slice is
    factorised by SVD; its leading `depth_multiplier` singular pairs become the depthwise
    filters and the pointwise weights. Low-rank: the whole kernel, as a (kxk x C_in) x
    C_out matrix, keeps its leading r singular pairs (the kxk conv to r channels and the 1x1
    conv after it). Both are the best approximations of their form in the Frobenius norm.
    The student's BN takes the teacher block's BN (or the conv bias) so that the student
    starts close to the teacher's output instead of spending its first epochs getting there.
    """
    if block.kind != "conv" or block.family not in ("separable", "low_rank"):
        return {}  # only a single conv has a kernel to factorise
    conv = teacher.get_layer(block.layers[0])
    if getattr(conv, "groups", 1) != 1:
        return {}
    kernel = dense_kernel(conv)
    if block.family == "separable":
        factors = _separable_factors(kernel, depth_multiplier)
    else:
        factors = _low_rank_factors(kernel, block.width * depth_multiplier)
    if factors is None:
        return {}
    prefix = f"{block.name}_student"
    first = "dw" if block.family == "separable" else "reduce"
    return {f"{prefix}_{first}": [factors[0]], f"{prefix}_pw": [factors[1]],
            f"{prefix}_bn": _teacher_norm(block, teacher, conv, kernel.shape[-1])}


def dense_kernel(conv) -> np.ndarray:
    """The (*window, c_in, c_out) kernel a conv applies, window (kh, kw) or (k,); a
    separable conv's is its depthwise filters times its pointwise weights, a Dense
    layer's a 1x1 kernel."""
    if isinstance(conv, keras.layers.Dense):  # on feature maps or sequences: a 1x1 conv
        kernel = conv.kernel.numpy()
        return kernel.reshape((1,) * (len(conv.input.shape) - 2) + kernel.shape)
    if isinstance(conv, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        depthwise = conv.depthwise_kernel.numpy()  # (*window, c_in, m)
        c_in, m = depthwise.shape[-2:]
        pointwise = conv.pointwise_kernel.numpy().reshape(c_in, m, -1)
        return np.einsum("...cm,cmo->...co", depthwise, pointwise)
    return conv.kernel.numpy()


def _separable_factors(kernel, depth_multiplier: int):
    """(depthwise, pointwise) kernels of the tiled separable student: channel j * c_in + c
    of the depthwise conv (copy j of input channel c) holds channel c's j-th singular
    pair."""
    *window, c_in, c_out = kernel.shape
    taps = int(np.prod(window))
    if depth_multiplier > min(taps, c_out):
        return None
    depthwise = np.zeros((*window, depth_multiplier * c_in, 1), np.float32)
    pointwise = np.zeros((*[1] * len(window), depth_multiplier * c_in, c_out), np.float32)
    for channel in range(c_in):
        u, sigma, vt = np.linalg.svd(kernel[..., channel, :].reshape(taps, c_out),
                                     full_matrices=False)
        for j in range(depth_multiplier):
            root = np.sqrt(sigma[j])
            depthwise[..., j * c_in + channel, 0] = (u[:, j] * root).reshape(window)
            pointwise[..., j * c_in + channel, :] = vt[j] * root
    return depthwise, pointwise


def _low_rank_factors(kernel, rank: int):
    *window, c_in, c_out = kernel.shape
    u, sigma, vt = np.linalg.svd(kernel.reshape(-1, c_out), full_matrices=False)
    if rank > len(sigma):
        return None
    root = np.sqrt(sigma[:rank])
    reduce = (u[:, :rank] * root).reshape(*window, c_in, rank).astype(np.float32)
    pointwise = (root[:, None] * vt[:rank]).reshape(*[1] * len(window), rank, c_out)
    return reduce, pointwise.astype(np.float32)


def _teacher_norm(block: Block, teacher, conv, c_out: int) -> list:
    """The student BN's [gamma, beta, mean, variance] that reproduce the teacher's BN
    after its conv (or the conv's bias where no BN follows)."""
    bias = conv.bias.numpy() if conv.use_bias else np.zeros(c_out, np.float32)
    norms = [teacher.get_layer(name) for name in block.layers[1:]
             if isinstance(teacher.get_layer(name), keras.layers.BatchNormalization)]
    ones, zeros = np.ones(c_out, np.float32), np.zeros(c_out, np.float32)
    eps = keras.layers.BatchNormalization().epsilon
    if norms and block.layers.index(norms[0].name) == 1:  # a BN right after the conv
        norm = norms[0]
        gamma = norm.gamma.numpy() if norm.scale else ones
        beta = norm.beta.numpy() if norm.center else zeros
        mean, variance = norm.moving_mean.numpy() - bias, norm.moving_variance.numpy()
        # The student's BN uses Keras' default epsilon; fold the teacher's into the variance.
        return [gamma, beta, mean, variance + norm.epsilon - eps]
    return [ones, bias, zeros, ones - eps]


def student_cost(block: Block, depth_multiplier: int = 1) -> tuple[int, int]:
    """(params, FLOPs) of the block's student. Cached by what shapes the student: planning
    asks for the same block's cost several times (sizing, the size check, the table), deep
    networks repeat blocks of one shape (EfficientNetB7: 686 questions, mostly repeats),
    and each answer is a build."""
    return _structure_cost(replace(block, name="student", layers=(), input_boundary="",
                                   output_boundary="", teacher_params=0, teacher_flops=0,
                                   convs=0), depth_multiplier)


@functools.lru_cache(maxsize=4096)
def _structure_cost(block: Block, depth_multiplier: int) -> tuple[int, int]:
    with shapes_only():
        model = build_student_model(block, depth_multiplier)
    return layers_cost([layer for layer in model.layers
                        if not isinstance(layer, keras.layers.InputLayer)])


def is_smaller(block: Block, depth_multiplier: int = 1) -> bool:
    """Whether the block's student has fewer parameters than the teacher block: a 1x1
    conv, for one, is already pointwise and a separable student could only grow it."""
    return student_cost(block, depth_multiplier)[0] < block.teacher_params


def layer_weights(model) -> dict[str, list]:
    """Weights by layer name: what a worker sends back and the assembler sets."""
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
