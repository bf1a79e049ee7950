import keras
import numpy as np
import pytest
from keras import layers

from pbkd_mpi.graph import find_blocks
from pbkd_mpi.students import build_student_model


def _model(stride, padding, ending):
    inputs = keras.Input((9, 9, 6))
    x = layers.Conv2D(12, 3, strides=stride, padding=padding, use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    if ending == "relu":
        x = layers.ReLU(name="relu")(x)
    elif ending == "swish":
        x = layers.Activation("swish", name="act")(x)
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x))


@pytest.mark.parametrize("stride, padding, ending", [
    (1, "same", "relu"), (2, "same", "linear"), (2, "valid", "swish"), (1, "valid", "relu")])
def test_student_matches_the_teacher_block_and_is_cheaper(stride, padding, ending):
    (block,) = find_blocks(_model(stride, padding, ending))
    student = build_student_model(block)
    assert tuple(student.output.shape[1:]) == block.output_shape
    kinds = [type(layer).__name__ for layer in student.layers[1:]]
    assert kinds[:5] == ["DepthwiseConv2D", "BatchNormalization", "ReLU", "Conv2D",
                         "BatchNormalization"]
    assert student.layers[4].kernel_size == (1, 1)  # pointwise
    assert student.count_params() < block.teacher_params
    if ending == "linear":
        assert len(kinds) == 5  # pre-activation target: the student ends linear
    else:
        assert len(kinds) == 6


def test_linear_student_can_produce_negative_values():
    (block,) = find_blocks(_model(1, "same", "linear"))
    student = build_student_model(block)
    out = student(np.random.default_rng(0).normal(size=(4, 9, 9, 6)).astype("float32"))
    assert float(np.min(out)) < 0
