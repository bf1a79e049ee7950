import keras
import numpy as np
import pytest
from keras import layers

from pbkd_mpi.errors import UserError
from pbkd_mpi.model.cost import layer_flops, model_flops
from pbkd_mpi.model.graph import (MODEL_INPUT, _layer_graph, boundaries, cut_points, find_blocks,
                                  flatten_model)


def test_demo_teacher_blocks_are_conv_bn_relu_groups(tiny_teacher):
    blocks = find_blocks(tiny_teacher)
    assert [b.name for b in blocks] == ["conv1", "conv2", "conv3", "conv4"]
    assert blocks[0].layers == ("conv1", "bn1", "relu1")
    assert blocks[0].input_boundary == MODEL_INPUT
    assert blocks[1].input_boundary == "relu1"
    assert blocks[2].input_boundary == "pool1"  # the pool stays the teacher's
    assert blocks[2].input_shape == (8, 8, 8) and blocks[2].output_shape == (8, 8, 16)
    assert all(b.final_activation == "relu" for b in blocks)
    assert boundaries(blocks) == [MODEL_INPUT, "relu1", "relu2", "pool1", "relu3", "relu4"]
    conv, bn = tiny_teacher.get_layer("conv2"), tiny_teacher.get_layer("bn2")
    assert blocks[1].teacher_params == conv.count_params() + bn.count_params()


def test_conv_flops_match_a_hand_count():
    model = keras.Sequential([keras.Input((10, 10, 4)),
                              layers.Conv2D(6, 3, strides=2, padding="same", use_bias=True)])
    # 5x5 outputs x 6 channels, each 3*3*4 multiply-adds, plus one bias add each.
    assert layer_flops(model.layers[0]) == 5 * 5 * 6 * (2 * 3 * 3 * 4) + 5 * 5 * 6
    assert model_flops(model) == layer_flops(model.layers[0])


def test_block_endings_follow_the_teacher():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = layers.BatchNormalization(name="a_bn")(x)  # pre-activation output
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(4, 3, padding="valid", strides=2, activation="relu6", name="b")(x)
    x = layers.Conv2D(4, 1, name="c")(x)
    x = layers.ReLU(max_value=6.0, name="c_relu6")(x)
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    blocks = {b.name: b for b in find_blocks(model)}
    assert blocks["a"].final_activation == "linear"
    assert blocks["b"].final_activation == "relu6" and blocks["b"].strides == (2, 2)
    assert blocks["b"].padding == "valid" and blocks["b"].output_shape == (1, 1, 4)
    assert blocks["c"].final_activation == "relu_max(6.0)"


def test_a_skip_connection_stays_inside_one_block():
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(3, 3, padding="same", name="a")(inputs)
    a = layers.ReLU(name="a_relu")(a)
    b = layers.Conv2D(3, 3, padding="same", name="b")(a)
    added = layers.Add(name="skip")([b, a])
    out = layers.ReLU(name="out")(added)
    model = keras.Model(inputs, layers.GlobalAveragePooling2D(name="gap")(out))
    assert cut_points(_layer_graph(model)) == ["a", "a_relu", "skip", "out", "gap"]
    # `layer`: each conv group, the one inside the residual branch included.
    assert [b.layers for b in find_blocks(model, "layer")] == [("a", "a_relu"), ("b",)]
    assert find_blocks(model, "layer")[1].input_boundary == "a_relu"
    # `block`: the residual block, from its input tensor to the ReLU after the Add.
    first, residual = find_blocks(model, "block")
    assert first.layers == ("a", "a_relu") and first.kind == "conv"
    assert residual.layers == ("b", "skip", "out") and residual.kind == "segment"
    assert residual.input_boundary == "a_relu" and residual.output_boundary == "out"
    assert residual.final_activation == "relu" and residual.width == 3
    # `stage`: one spatial size throughout, so both merge.
    (stage,) = find_blocks(model, "stage")
    assert stage.layers == ("a", "a_relu", "b", "skip", "out")
    assert stage.input_boundary == MODEL_INPUT


def test_a_block_ending_in_an_add_is_pre_activation():
    inputs = keras.Input((8, 8, 4))
    x = layers.ReLU(name="stem")(inputs)
    y = layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    y = layers.Conv2D(4, 3, padding="same", name="c2")(y)
    added = layers.Add(name="add")([x, y])
    model = keras.Model(inputs, layers.Flatten(name="flat")(added))
    (block,) = find_blocks(model, "block")
    assert block.output_boundary == "add" and block.final_activation == "linear"
    assert block.convs == 2 and block.strides == (1, 1)


def test_explicit_blocks_are_checked():
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(3, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(3, 3, padding="same", name="b")(a)
    added = layers.Add(name="skip")([b, a])
    model = keras.Model(inputs, added)
    (block,) = find_blocks(model, [("b", "skip")])
    assert block.input_boundary == "a" and block.layers == ("b", "skip")
    with pytest.raises(UserError, match="no layer 'nope'"):
        find_blocks(model, [("a", "nope")])
    with pytest.raises(UserError, match="one input tensor and one output tensor"):
        find_blocks(model, [("a", "b")])  # a's output also feeds the Add outside the block
    with pytest.raises(UserError, match="granularity among layer, block, stage"):
        find_blocks(model, "blocks")


def test_nested_backbone_is_flattened_with_the_same_weights():
    backbone = keras.Sequential([
        keras.Input((8, 8, 3)),
        layers.Conv2D(4, 3, padding="same", name="bb_conv"),
        layers.BatchNormalization(name="bb_bn"),
        layers.ReLU(name="bb_relu"),
    ], name="backbone")
    inputs = keras.Input((8, 8, 3))
    x = backbone(inputs)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="head_conv")(x)
    model = keras.Model(inputs, layers.GlobalAveragePooling2D(name="gap")(x))
    flat = flatten_model(model)
    assert [layer.name for layer in flat.layers[1:]] == [
        "bb_conv", "bb_bn", "bb_relu", "head_conv", "gap"]
    assert flat.get_layer("bb_conv") is not backbone.get_layer("bb_conv")
    x_in = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(flat.predict(x_in, verbose=0), model.predict(x_in, verbose=0),
                               atol=1e-6)
    assert [b.layers for b in find_blocks(model)] == [
        ("bb_conv", "bb_bn", "bb_relu"), ("head_conv",)]
    assert flatten_model(flat) is flat  # nothing nested: the model itself


def test_subclassed_model_gets_advice():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(2, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="subclassed model .*Functional API or keras.Sequential"):
        find_blocks(net)


def test_model_without_conv_has_no_blocks():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    with pytest.raises(UserError, match="has no Conv2D, Conv1D or separable conv layer that can be cut"):
        find_blocks(model)
