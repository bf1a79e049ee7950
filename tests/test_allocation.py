import keras
import numpy as np
import pytest
from keras import layers

from pbkd_mpi.model.allocation import energy_shares, truncation_error
from pbkd_mpi.model.selection import block_table_of, select_blocks


def _teacher():
    """Three same-shaped convs: one whose kernel is nearly rank 3, two random ones (flat
    spectra): a low-rank student of the first loses little at a small rank."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 32))
    x = inputs
    for name in ("easy", "hard", "harder"):
        x = layers.Conv2D(32, 3, padding="same", use_bias=False, name=name)(x)
        x = layers.ReLU(name=f"{name}_relu")(layers.BatchNormalization(name=f"{name}_bn")(x))
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    rng = np.random.default_rng(0)
    low = rng.normal(size=(288, 3)) @ rng.normal(size=(3, 32))
    easy = model.get_layer("easy")
    easy.kernel.assign((low + 0.01 * rng.normal(size=low.shape)).reshape(3, 3, 32, 32))
    return model


def test_energy_shares_are_the_normalised_squared_singular_values():
    kernel = np.random.default_rng(1).normal(size=(3, 3, 4, 5))
    sigma = np.linalg.svd(kernel.reshape(36, 5), compute_uv=False)
    np.testing.assert_allclose(energy_shares(kernel), sigma ** 2 / np.sum(sigma ** 2))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_spectrum_allocation_gives_hard_kernels_the_rank_and_keeps_the_target(multiplier):
    teacher = _teacher()
    uniform = select_blocks(teacher, "layer", multiplier, target=0.3)
    spectrum = select_blocks(teacher, "layer", multiplier, target=0.3, allocation="spectrum")
    assert [b.family for b in spectrum] == ["low_rank"] * 3
    widths = {b.name: b.width for b in spectrum}
    assert len({b.width for b in uniform}) == 1  # same shapes, same share
    assert widths["easy"] < uniform[0].width < min(widths["hard"], widths["harder"])
    totals = {name: block_table_of(blocks, multiplier)["totals"]
              for name, blocks in (("uniform", uniform), ("spectrum", spectrum))}
    step = 2 * multiplier * (9 * 32 + 32)  # the largest width step of these blocks
    for total in totals.values():
        assert total["student_params"] <= 0.3 * total["teacher_params"] + step
    assert abs(totals["spectrum"]["student_params"]
               - totals["uniform"]["student_params"]) <= step
    errors = {name: sum(truncation_error(b, teacher, multiplier) for b in blocks)
              for name, blocks in (("uniform", uniform), ("spectrum", spectrum))}
    assert errors["spectrum"] < errors["uniform"], errors
    # Without a target there is nothing to share.
    assert select_blocks(teacher, "layer", multiplier, allocation="spectrum") == (
        select_blocks(teacher, "layer", multiplier))
