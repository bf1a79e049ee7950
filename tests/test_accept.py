"""Per-block acceptance on validation: a good student block is accepted, a broken one is
retrained wider once and, still broken, stays the teacher's."""

from __future__ import annotations

import numpy as np
import pytest

from pbkd_mpi.config import AcceptConfig
from pbkd_mpi.distill.accept import ACCEPTED, ACCEPTED_WIDER, KEPT_TEACHER, Judge
from pbkd_mpi.model.choice import StudentChoice

published = StudentChoice.published


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


def judge_all(judge, trained: dict, retrain, teacher, dataset) -> list:
    """Drive `judge` as the parallel phase does, scoring here (score.score_with) what the
    workers would: every first student arrives, each requested score is run, and a block
    it asks to retrain arrives again from `retrain(name, student)` (student: the retry's
    model/choice.Candidate; None: the retrain failed). The block scores go in before the teacher's, as they may on the workers.
    Returns the names it asked to retrain."""
    from pbkd_mpi.distill.score import score_with

    asked = []
    for name, weights in trained.items():
        judge.arrived(name, weights)
    while judge.busy():
        scores, retrains = judge.take_requests()
        for task in sorted(scores, key=lambda t: t.block is None):  # the teacher's last
            judge.scored(task, score_with(teacher, dataset, task)["val_accuracy"], 0.5)
        for name in retrains:
            asked.append(name)
            wide = retrain(name, judge.student(name, retry=True))
            if wide is None:
                judge.wider_failed(name)
            else:
                judge.arrived(name, wide, wider=True)
    return asked


def test_all_accepted_when_any_drop_is_allowed(setting, tiny_dataset):
    teacher, blocks, good = setting
    judge = Judge(published(blocks, 2, 2), AcceptConfig(max_drop=1.0), log=lambda m: None)
    with pytest.raises(RuntimeError, match="not complete"):
        judge.acceptance()
    assert judge_all(judge, good, lambda *_: pytest.fail("nothing to retrain"), teacher,
                     tiny_dataset) == []
    verdicts, kept, multipliers, _, teacher_val, seconds = judge.acceptance()
    assert {v.decision for v in verdicts.values()} == {ACCEPTED}
    assert list(verdicts) == [b.name for b in blocks]  # the blocks' order
    assert set(kept) == {b.name for b in blocks} and set(multipliers.values()) == {2}
    assert teacher_val > 1.5 / tiny_dataset.num_classes  # the trained teacher beats chance
    assert seconds == pytest.approx(0.5 * (len(blocks) + 1))  # every score, the teacher's
    for v in verdicts.values():
        assert v.drop == pytest.approx(teacher_val - v.solo_val_accuracy)


@pytest.mark.parametrize("retrain_fails", [False, True])
def test_a_broken_block_is_retrained_wider_then_kept_as_the_teachers(
        setting, tiny_dataset, retrain_fails):
    teacher, blocks, good = setting
    broken_name = blocks[1].name
    trained = dict(good) | {broken_name: _broken(good[broken_name])}
    multipliers_asked = []

    def retrain(name, student):
        from pbkd_mpi.model.students import initial_weights

        multiplier = student.depth_multiplier
        multipliers_asked.append(multiplier)
        if retrain_fails or name != broken_name:  # (SVD-started students may fail too)
            return None
        return _broken(initial_weights(blocks[1], teacher, multiplier))  # the wider shapes

    judge = Judge(published(blocks, 2, 2), AcceptConfig(max_drop=0.1, widen=2),
                  log=lambda m: None)
    assert broken_name in judge_all(judge, trained, retrain, teacher, tiny_dataset)
    assert set(multipliers_asked) == {4}
    verdicts, kept, multipliers, _, teacher_val, _ = judge.acceptance()
    broken = verdicts[broken_name]
    assert broken.drop > 0.1, broken  # a constant block costs far more than 10 points
    assert broken.decision == KEPT_TEACHER and broken.depth_multiplier == 4
    assert (broken.wider_solo_val_accuracy is None) == retrain_fails
    assert broken_name not in kept and broken_name not in multipliers
    assert set(kept) == {name for name, v in verdicts.items() if v.decision == ACCEPTED}


def test_a_wider_student_that_passes_is_kept(setting, tiny_dataset):
    from pbkd_mpi.model.students import initial_weights

    teacher, blocks, good = setting
    name = blocks[1].name
    judge = Judge(published(blocks, 2, 2), AcceptConfig(max_drop=0.1, widen=2),
                  log=lambda m: None)
    wide = initial_weights(blocks[1], teacher, 4)
    judge_all(judge, {name: _broken(good[name])}, lambda *_: wide, teacher, tiny_dataset)
    verdicts, kept, multipliers, _, _, _ = judge.acceptance()
    assert verdicts[name].decision == ACCEPTED_WIDER and kept[name] is wide
    assert multipliers == {name: 4} and verdicts[name].wider_drop <= 0.1


def test_the_retry_is_the_next_candidate_and_its_block_is_kept(setting, tiny_dataset):
    """Under the latency objective the retry is another family's student: it is scored as
    that student, and acceptance keeps its block (family and width) for the assembly."""
    from dataclasses import replace

    from pbkd_mpi.distill.accept import kept_blocks
    from pbkd_mpi.model.choice import Candidate, candidates
    from pbkd_mpi.model.students import initial_weights

    teacher, blocks, good = setting
    block = blocks[1]
    assert any(c.block.family == "low_rank" for c in candidates(block, 2))
    # At full rank its SVD start is the teacher's conv itself, so the retry passes.
    full = min(int(np.prod(block.kernel_size)) * block.input_shape[-1], block.output_shape[-1])
    low_rank = Candidate(replace(block, family="low_rank", width=full), 1)
    choice = StudentChoice(tuple(blocks), {b.name: 2 for b in blocks},
                           {b.name: Candidate(b, 4) for b in blocks} | {block.name: low_rank},
                           {})
    judge = Judge(choice, AcceptConfig(max_drop=0.1), log=lambda m: None)
    asked = []

    def retrain(name, student):
        asked.append(student)
        return initial_weights(student.block, teacher, student.depth_multiplier)

    judge_all(judge, {block.name: _broken(good[block.name])}, retrain, teacher, tiny_dataset)
    assert asked == [low_rank]
    acceptance = judge.acceptance()
    verdict = acceptance.verdicts[block.name]
    assert verdict.decision == ACCEPTED_WIDER, verdict
    assert (verdict.family, verdict.width, verdict.depth_multiplier) == (
        "low_rank", low_rank.block.width, 1)
    assert kept_blocks(blocks, acceptance) == [replace(block, family="low_rank",
                                                       width=low_rank.block.width)
                                               if b is block else b for b in blocks]


def test_the_teacher_is_scored_with_its_bn_statistics_re_estimated_as_a_solo_swap_is(
        setting, tiny_dataset):
    """A drop must be the block's alone: the teacher's score goes through the same BN
    re-estimation as each solo swap, so stale statistics of the teacher's cancel out."""
    import keras

    from pbkd_mpi.distill.score import teacher_accuracy
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
