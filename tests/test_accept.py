"""Per-block acceptance on validation: a good student block is accepted, a broken one is
retrained wider once and, still broken, stays the teacher's."""

from __future__ import annotations

import numpy as np
import pytest

from pbkd_mpi.config import AcceptConfig
from pbkd_mpi.distill.accept import ACCEPTED, KEPT_TEACHER, accept_blocks


@pytest.fixture(scope="module")
def setting(tiny_dataset, tiny_teacher):
    import keras

    from pbkd_mpi.model.teacher import fit_classifier
    from pbkd_mpi.model.graph import flatten_model
    from pbkd_mpi.model.selection import select_blocks
    from pbkd_mpi.model.students import initial_weights

    teacher = keras.models.clone_model(tiny_teacher)
    teacher.set_weights(tiny_teacher.get_weights())
    fit_classifier(teacher, tiny_dataset, epochs=4, batch_size=32, learning_rate=3e-3,
                   patience=4, probabilities=True, seed=0)
    teacher = flatten_model(teacher)
    blocks = select_blocks(teacher, "layer", 2)
    good = {b.name: initial_weights(b, teacher, 2) for b in blocks}
    return teacher, blocks, good


def _broken(weights: dict) -> dict:
    """A student block that outputs a constant: its block's information is lost."""
    return {layer: [np.zeros_like(a) for a in arrays] for layer, arrays in weights.items()}


def test_all_accepted_when_any_drop_is_allowed(setting, tiny_dataset):
    teacher, blocks, good = setting
    calls = []
    verdicts, kept, multipliers, teacher_val = accept_blocks(
        teacher, blocks, good, 2, AcceptConfig(max_drop=1.0), tiny_dataset.x_val,
        tiny_dataset.y_val, lambda names, m: calls.append(names) or {}, log=lambda m: None,
        x_calibrate=tiny_dataset.x_train)
    assert calls == []  # nothing to retrain
    assert {v.decision for v in verdicts.values()} == {ACCEPTED}
    assert set(kept) == {b.name for b in blocks} and set(multipliers.values()) == {2}
    assert teacher_val > 1.5 / tiny_dataset.num_classes  # the trained teacher beats chance
    for v in verdicts.values():
        assert v.drop == pytest.approx(teacher_val - v.solo_val_accuracy)


def test_a_broken_block_is_retrained_wider_then_kept_as_the_teachers(setting, tiny_dataset):
    teacher, blocks, good = setting
    broken_name = blocks[1].name
    trained = dict(good) | {broken_name: _broken(good[broken_name])}
    asked = []

    def retrain(names, multiplier):
        from pbkd_mpi.model.students import initial_weights

        asked.append((list(names), multiplier))
        wide = initial_weights(blocks[1], teacher, multiplier)  # the wider student's shapes
        return {broken_name: _broken(wide)} if broken_name in names else {}

    verdicts, kept, multipliers, teacher_val = accept_blocks(
        teacher, blocks, trained, 2, AcceptConfig(max_drop=0.1, widen=2), tiny_dataset.x_val,
        tiny_dataset.y_val, retrain, log=lambda m: None, x_calibrate=tiny_dataset.x_train)
    broken = verdicts[broken_name]
    assert broken.drop > 0.1, broken  # a constant block costs far more than 10 points
    assert asked and broken_name in asked[0][0] and asked[0][1] == 4
    assert broken.decision == KEPT_TEACHER and broken.wider_solo_val_accuracy is not None
    assert broken_name not in kept and broken_name not in multipliers


def test_the_teacher_is_scored_with_its_bn_statistics_re_estimated_as_a_solo_swap_is(
        setting, tiny_dataset):
    """A drop must be the block's alone: the teacher's score goes through the same BN
    re-estimation as each solo swap, so stale statistics of the teacher's cancel out."""
    import keras

    from pbkd_mpi.distill.accept import teacher_accuracy
    from pbkd_mpi.model.evaluate import accuracy

    teacher, _, _ = setting
    x, y, x_train = tiny_dataset.x_val, tiny_dataset.y_val, tiny_dataset.x_train
    stale = keras.models.clone_model(teacher)
    stale.set_weights(teacher.get_weights())
    for layer in stale.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma, beta, mean + 3.0, variance * 9.0])
    assert teacher_accuracy(stale, x, y) == accuracy(stale, x, y)  # nothing to calibrate on
    assert teacher_accuracy(stale, x, y, x_train) == teacher_accuracy(teacher, x, y, x_train)
    assert teacher_accuracy(stale, x, y, x_train) > accuracy(stale, x, y)
