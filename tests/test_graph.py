import keras
import numpy as np
import pytest
from keras import layers

from pbkd_mpi.cost import layer_flops, model_flops
from pbkd_mpi.errors import UserError
from pbkd_mpi.graph import MODEL_INPUT, boundaries, find_blocks


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


def test_graphs_with_branches_are_refused_with_the_layer_named():
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(3, 3, padding="same", name="a")(inputs)
    added = layers.Add(name="skip")([a, inputs])
    model = keras.Model(inputs, added)
    with pytest.raises(UserError, match="not a chain: layer 'skip'"):
        find_blocks(model)


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
    with pytest.raises(UserError, match="has no Conv2D layer"):
        find_blocks(model)
