"""The last block's distillation through the teacher's head (head_loss.py)."""

import keras
import numpy as np
import pytest

from pbkd_mpi.distill.head_loss import cut_head
from pbkd_mpi.model.graph import find_blocks
from pbkd_mpi.model.logits import logits_model


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("ending", ["dense_softmax", "logits"])
def test_the_cut_head_gives_the_teachers_logits_and_the_loss_is_mse_plus_hinton(
        tiny_teacher, tiny_dataset, ending):
    teacher = tiny_teacher
    if ending == "logits":  # the same network ending in a linear Dense
        dense = teacher.layers[-1]
        out = keras.layers.Dense(dense.units, name="linear_logits")(dense.input)
        teacher = keras.Model(teacher.inputs[0], out)
        teacher.layers[-1].set_weights(dense.get_weights())
    last = find_blocks(teacher)[-1]
    head = cut_head(teacher, last.output_boundary, weight=0.5, temperature=3.0)
    images = tiny_dataset.x_val[:16]
    activation = keras.Model(teacher.inputs[0], teacher.get_layer(last.output_boundary).output)(
        images).numpy()
    expected = np.asarray(logits_model(teacher)(images))
    logits = head.logits_function()
    np.testing.assert_allclose(np.asarray(logits(activation)), expected, rtol=1e-4, atol=1e-4)

    loss = head.keras_loss()
    assert float(loss(activation, activation)) == pytest.approx(0.0, abs=1e-6)
    perturbed = activation + np.random.default_rng(0).normal(0, 0.3, activation.shape).astype(
        np.float32)
    p = _softmax(expected / 3.0)
    q = _softmax(np.asarray(logits(perturbed)) / 3.0)
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))
    mse = np.mean((activation - perturbed) ** 2)
    assert kl > 0
    assert float(loss(activation, perturbed)) == pytest.approx(mse + 0.5 * 9.0 * kl, rel=1e-4)


def test_no_head_when_it_reads_more_than_the_block_or_its_weight_is_zero(tiny_teacher):
    last = find_blocks(tiny_teacher)[-1]
    assert cut_head(tiny_teacher, last.output_boundary, weight=0.0, temperature=4.0) is None
    # A skip connection around the last conv: the head also reads the tensor before it.
    inputs = keras.Input((8, 8, 4))
    early = keras.layers.Conv2D(4, 3, padding="same", name="early")(inputs)
    block = keras.layers.Conv2D(4, 3, padding="same", name="block")(early)
    joined = keras.layers.Add(name="add")([early, block])
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(joined)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    assert cut_head(model, "block", weight=1.0, temperature=4.0) is None
    assert cut_head(model, "add", weight=1.0, temperature=4.0) is not None
