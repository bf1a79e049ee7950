"""The student of each block chosen by the job's objective (model/choice.py): candidates
within the published student's parameters, timed for real on the target runtime, the
choice kept in the run directory for the next run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from pbkd_mpi.config import load_job
from pbkd_mpi.errors import UserError
from pbkd_mpi.model.block_timing import check_target

from pbkd_mpi.model.choice import (CHOICE_FILE, TEACHER, Candidate, _deployed, candidates,
                                   choose_students, from_record, nothing_to_train)
from pbkd_mpi.output.report import describe_record


@pytest.fixture(scope="module")
def blocks(tiny_teacher):
    from pbkd_mpi.model.graph import flatten_model
    from pbkd_mpi.model.selection import select_blocks

    return select_blocks(flatten_model(tiny_teacher), "layer", 2)


def test_candidates_fit_the_published_students_parameters(blocks):
    from pbkd_mpi.model.students import build_student_model

    for block in blocks:
        found = candidates(block, 2)
        assert (found[0].block, found[0].depth_multiplier) == (block, 2)  # published first
        budget = found[0].cost[0]
        assert [(c.block.family, c.depth_multiplier) for c in found] == [
            ("separable", 2), ("low_rank", 1)], found
        low_rank = found[1]
        for candidate in found:
            assert candidate.cost[0] <= budget
            model = build_student_model(candidate.block, candidate.depth_multiplier)
            assert tuple(model.output_shape[1:]) == tuple(block.output_shape)
        assert candidates(block, 2, pinned=True) == found[:1]
        # The widest that fits: one rank more would not.
        wider = replace(low_rank.block, width=low_rank.block.width + 1)
        assert Candidate(wider, 1).cost[0] > budget


def _check_rule(row, families, measures):
    """Each candidate timed at every measure (runtime/batch); its relative time the
    geometric mean of its time over the fastest's at each; the first candidate the most
    accurate (in `families` order) within min_speedup (1.25) of the fastest."""
    rows = row["candidates"]
    by_family = {c["family"]: c for c in rows}
    assert set(by_family) == set(families)
    for c in rows:
        assert list(c["latency_ms"]) == measures
        assert all(ms > 0 for ms in c["latency_ms"].values())
        ratios = [c["latency_ms"][m] / min(o["latency_ms"][m] for o in rows)
                  for m in measures]
        assert c["relative_time"] == pytest.approx(math.prod(ratios) ** (1 / len(measures)))
    fastest = min(c["relative_time"] for c in rows)
    assert fastest == pytest.approx(1.0) or len(measures) > 1
    assert rows[0] is next(by_family[f] for f in families
                           if by_family[f]["relative_time"] <= 1.25 * fastest)
    return by_family


def test_latency_takes_the_most_accurate_candidate_near_the_fastest(tiny_teacher, blocks,
                                                                    tmp_path):
    job = load_job(None, ["student.objective=latency", "student.target=tflite",
                          "student.latency_batches=[4]", "accept.widen=2",
                          "student.keep_teacher=false"])
    messages = []
    choice = choose_students(tiny_teacher, blocks, job, "teacher-fp", tmp_path,
                             messages.append)
    record = choice.record
    assert record["objective"] == "latency" and "TFLite" in record["runtime"]
    assert [b.name for b in choice.blocks] == [b.name for b in blocks]  # all trained
    for block, trained, row in zip(blocks, choice.blocks, record["blocks"]):
        by_family = _check_rule(row, ("separable", "low_rank"), ["tflite/4"])
        first, published = row["candidates"][0], by_family["separable"]
        assert published["published"] and not by_family["low_rank"]["published"]
        assert (trained.family, trained.width, choice.multipliers[block.name]) == (
            first["family"], first["width"], first["depth_multiplier"])
        retry = choice.retries[block.name]  # the published student, wider when it went first
        assert (retry.block.family, retry.block.width, retry.depth_multiplier) == (
            "separable", published["width"], 4 if first is published else 2)
    saved = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert saved == json.loads(json.dumps(record))
    assert any("students (latency" in m for m in messages)
    # The next run of the directory trains the same students, whatever the clock says now.
    again = choose_students(tiny_teacher, blocks, job, "teacher-fp", tmp_path,
                            messages.append)
    assert again.blocks == choice.blocks and again.multipliers == choice.multipliers
    assert again.retries == choice.retries and "earlier run" in messages[-1]
    # Another teacher (or other settings) is another choice, measured again.
    other = choose_students(tiny_teacher, blocks, job, "other-fp", tmp_path, messages.append)
    assert other.record["key"] != record["key"]
    assert describe_record(record)[0].startswith("students: objective latency")


def test_timings_from_elsewhere_choose_by_the_same_rule(tiny_teacher, blocks):
    """A run times the candidates on the workers (model/choice_timing.py) and passes their
    figures in: each block's candidates are asked for once, in order, and the rule picks
    from those figures alone."""
    job = load_job(None, ["student.target=tflite", "student.latency_batches=[1, 8]"])
    asked = []

    def time_blocks(pairs, student):
        asked.extend((block.name, [c.block.family for c in found]) for block, found in pairs)
        # teacher, separable, low-rank: the separable 1.3x faster than the teacher at both
        # batches, so the teacher is not within 1.25; the low-rank 1.2x faster still.
        return ({block.name: {"tflite/1": [1.3, 1.0, 1.0 / 1.2],
                              "tflite/8": [13.0, 10.0, 10.0 / 1.2]}
                 for block, _ in pairs}, "2 worker rank(s) at once, 1 thread(s) each")

    choice = choose_students(tiny_teacher, blocks, job, "fp", None, lambda m: None,
                             time_blocks)
    assert asked == [(b.name, [TEACHER, "separable", "low_rank"]) for b in blocks]
    assert choice.record["timed_on"] == "2 worker rank(s) at once, 1 thread(s) each"
    for row in choice.record["blocks"]:
        _check_rule(row, (TEACHER, "separable", "low_rank"), ["tflite/1", "tflite/8"])
        assert row["candidates"][0]["family"] == "separable"  # 1.2x the low-rank: within
    assert [b.family for b in choice.blocks] == ["separable"] * len(blocks)


def test_the_teachers_block_is_timed_beside_its_students(tiny_teacher, blocks):
    """The default target (`cpu`: TFLite and Keras) and keep_teacher: the teacher's block
    is the first candidate in order of accuracy; a block the user pinned has its student
    alone, so something is trained."""
    pinned = blocks[-1].name
    job = load_job(None, ["student.latency_batches=[1, 8]",
                          f"student.family_overrides=[\"{pinned}=separable\"]"])
    choice = choose_students(tiny_teacher, blocks, job, "fp", None, lambda m: None)
    for block, row in zip(blocks, choice.record["blocks"]):
        if block.name == pinned:
            assert [c["family"] for c in row["candidates"]] == ["separable"]
            continue
        by_family = _check_rule(row, (TEACHER, "separable", "low_rank"),
                                ["tflite/1", "tflite/8", "keras-cpu/1", "keras-cpu/8"])
        assert by_family[TEACHER]["params"] == block.teacher_params
        kept = row["candidates"][0]["family"] == TEACHER
        assert kept is (block.name not in choice.multipliers)
    assert pinned in choice.multipliers


def test_a_224_px_block_is_timed_at_a_batch_that_keeps_one_call_short(blocks):
    from pbkd_mpi.model.choice import MAX_TIMED_FLOPS, timed_batches

    small = blocks[0]  # 16 px: batch 32 is far below the bound
    assert timed_batches(small, [1, 32]) == [1, 32]
    resnet = replace(small, teacher_flops=470_450_176)  # ResNet50's conv2_block1 at 224 px
    assert timed_batches(resnet, [1, 32]) == [1, 4]
    assert 4 * resnet.teacher_flops <= MAX_TIMED_FLOPS < 5 * resnet.teacher_flops
    vgg = replace(small, teacher_flops=7_398_752_256)  # VGG16's conv1_2 at 224 px
    assert timed_batches(vgg, [1, 32]) == [1]


def test_a_block_whose_teacher_is_fastest_keeps_it_and_all_kept_is_refused(blocks):
    """from_record on records made by hand: which block keeps the teacher's layers does
    not depend on this machine's clock."""
    def row(block, first):
        published = Candidate(block, 2).to_dict() | {"published": True}
        kept = Candidate(replace(block, family=TEACHER), 1).to_dict() | {"published": False}
        return {"name": block.name, "candidates": [kept, published] if first == TEACHER
                else [published, kept]}

    record = {"objective": "latency", "runtime": "TFLite", "batches": [1], "min_speedup": 1.25,
              "blocks": [row(blocks[0], TEACHER), row(blocks[1], "separable")]}
    choice = from_record(blocks[:2], record, 3)
    assert [b.name for b in choice.blocks] == [blocks[1].name]
    assert choice.retries[blocks[1].name].depth_multiplier == 6
    assert "teacher's block" in describe_record(record)[1]
    assert nothing_to_train(choice) is None
    record["blocks"][1] = row(blocks[1], TEACHER)
    assert "student would be the teacher" in nothing_to_train(from_record(blocks[:2], record, 3))


def test_the_tiled_separable_student_is_timed_faster_than_keras_depth_multiplier():
    """Why the separable student tiles its input (students.apply_separable_student),
    measured: XNNPACK runs a depthwise conv with one filter per channel on its fast
    kernels and Keras' depth_multiplier=2 on a generic grouped path (2x slower here), for
    the same function and parameters."""
    import keras

    from pbkd_mpi.model.block_timing import time_models
    from pbkd_mpi.model.graph import Block
    from pbkd_mpi.model.students import build_student_model

    block = Block("conv", ("conv",), "in", "conv", (16, 16, 64), (16, 16, 64), (3, 3), (1, 1),
                  "same", (1, 1), "relu", 36864, 0, width=64)
    tiled = build_student_model(block, 2)
    inputs = keras.Input(block.input_shape)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2,
                                     use_bias=False)(inputs)
    x = keras.layers.Conv2D(64, 1, use_bias=False)(x)
    grouped = keras.Model(inputs, keras.layers.ReLU()(keras.layers.BatchNormalization()(x)))
    assert tiled.count_params() == grouped.count_params()
    fast, slow = time_models([tiled, grouped], block.input_shape, "tflite", 8)
    assert fast < slow, (fast, slow)


def test_flops_and_params_objectives(tiny_teacher, blocks):
    flops = choose_students(tiny_teacher, blocks, load_job(None, ["student.objective=flops"]),
                            "fp", None, lambda m: None)
    for row in flops.record["blocks"]:
        counts = [c["flops"] for c in row["candidates"]]
        assert counts == sorted(counts) and "latency_ms" not in row["candidates"][0]
    params = choose_students(tiny_teacher, blocks,
                             load_job(None, ["student.objective=params", "accept.widen=3"]),
                             "fp", None, lambda m: None)
    assert params.blocks == tuple(blocks)
    assert set(params.multipliers.values()) == {2}  # the job's depth multiplier
    assert {r.depth_multiplier for r in params.retries.values()} == {6}  # retried wider
    assert all(len(row["candidates"]) == 1 for row in params.record["blocks"])


def test_a_family_override_pins_its_blocks(tiny_teacher, blocks):
    name = blocks[0].name
    job = load_job(None, ["student.objective=flops",
                          f"student.family_overrides=[\"{name}=separable\"]"])
    choice = choose_students(tiny_teacher, blocks, job, "fp", None, lambda m: None)
    assert len(choice.record["blocks"][0]["candidates"]) == 1
    assert choice.multipliers[name] == 2
    assert len(choice.record["blocks"][1]["candidates"]) > 1


def test_the_gpu_target_is_refused_without_a_gpu(tiny_teacher, blocks):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    job = load_job(None, ["student.target=gpu"])
    with pytest.raises(UserError, match=r"student.target = \"gpu\".*no GPU on this process"):
        choose_students(tiny_teacher, blocks, job, "fp", None, lambda m: None)
    # In a run, rank 0 refuses from the workers' placement (model/choice_timing.py).
    with pytest.raises(UserError, match=r"no GPU on worker rank\(s\) 2; set student.target"):
        check_target("gpu", "worker rank(s) 2")
    check_target("gpu", "")  # every worker has one
    check_target("cpu", "worker rank 1")  # a CPU target needs none


def test_every_candidate_starts_from_the_teacher_and_exports_to_tflite(tmp_path):
    """Each candidate a block may get: the teacher block's shape and stride, an SVD start
    closer to the teacher block than a fresh one, and the same outputs after `.keras` and
    TFLite export."""
    import keras
    import numpy as np
    import tensorflow as tf
    from keras import layers

    from pbkd_mpi.model.graph import find_blocks
    from pbkd_mpi.model.students import build_student_model, initial_weights
    from pbkd_mpi.output.exports import TfliteModel

    inputs = keras.Input((10, 10, 8))
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="conv")(inputs)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(name="bn")(x))
    teacher = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    (block,) = find_blocks(teacher)
    teacher_block = keras.Model(teacher.input, teacher.get_layer("relu").output)
    x = np.random.default_rng(0).normal(size=(16, 10, 10, 8)).astype(np.float32)
    target = teacher_block.predict(x, verbose=0)

    def error(model):
        return float(np.mean((model.predict(x, verbose=0) - target) ** 2) / np.var(target))

    found = candidates(block, 2)
    assert len(found) == 2, found  # separable x2 (tiled), low-rank
    for index, candidate in enumerate(found):
        student = build_student_model(candidate.block, candidate.depth_multiplier)
        assert tuple(student.output_shape[1:]) == (5, 5, 16)  # the teacher's stride
        fresh = error(student)
        for name, arrays in initial_weights(candidate.block, teacher,
                                            candidate.depth_multiplier).items():
            student.get_layer(name).set_weights(arrays)
        assert error(student) < fresh, candidate
        expected = student.predict(x, verbose=0)
        student.save(tmp_path / f"c{index}.keras")
        loaded = keras.saving.load_model(tmp_path / f"c{index}.keras")
        np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-4)
        path = tmp_path / f"c{index}.tflite"
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(student).convert())
        np.testing.assert_allclose(TfliteModel(path, threads=1)(x), expected, atol=1e-4)



def _bare_operation_teacher():
    """A stem conv, then three residual blocks whose skip is a bare `x + y` (a keras.ops
    call, no layer: ConvNeXt's and MobileNetV3's block boundaries) with a hard swish of bare
    operations inside (MobileNetV3's); the first two equal but for their dropout rate
    (EfficientNet's grows block by block), the third of another kernel size."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(16, 3, padding="same", name="stem")(inputs)
    for index, kernel in enumerate((3, 3, 5)):
        y = layers.Conv2D(16, kernel, padding="same", name=f"b{index}_conv1")(x)
        y = layers.BatchNormalization(name=f"b{index}_bn")(y)
        y = y * (keras.ops.relu6(y + 3.0) / 6.0)
        y = layers.Conv2D(16, kernel, padding="same", name=f"b{index}_conv2")(y)
        x = x + layers.Dropout(0.1 * index, name=f"b{index}_drop")(y)
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inputs, outputs, name="bare_ops")


def test_the_teachers_block_ending_at_a_bare_operation_is_timed_once_per_shape():
    """The teacher's own block as a latency candidate where the block ends at (and holds)
    bare keras.ops calls: copied whole (the copy of every block is the teacher), timed on
    TFLite beside its students; equal blocks are timed once and share the figures."""
    import keras
    import numpy as np

    from pbkd_mpi.model.assemble import copy_block, rewrite
    from pbkd_mpi.model.graph import block_structures, find_blocks
    from pbkd_mpi.model.selection import select_blocks
    from pbkd_mpi.model.students import layer_weights

    teacher = _bare_operation_teacher()
    operations = {op.name for op in teacher.operations if not isinstance(op, keras.layers.Layer)}
    found = find_blocks(teacher, "block")
    assert [b.output_boundary in operations for b in found] == [False, True, True, True]
    copied = rewrite(teacher, found, lambda block, t: copy_block(teacher, block, t),
                     layer_weights(teacher))
    x = np.random.default_rng(0).uniform(size=(2, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(copied.predict(x, verbose=0), teacher.predict(x, verbose=0),
                               atol=1e-5)
    structures = block_structures(teacher, found)
    assert structures[found[1].name] == structures[found[2].name] != structures[found[3].name]

    blocks = select_blocks(teacher, "block", 2)
    job = load_job(None, ["student.target=tflite", "student.latency_batches=[1]"])
    progress = []
    choice = choose_students(teacher, blocks, job, "fp", None, lambda m: None,
                             progress=lambda *args: progress.append(args))
    rows = {row["name"]: row for row in choice.record["blocks"]}
    first, second, third = (found[i].name for i in (1, 2, 3))
    for name in (first, second, third):
        families = [c["family"] for c in rows[name]["candidates"]]
        assert TEACHER in families and all("latency_ms" in c for c in rows[name]["candidates"])
    assert rows[second]["timing_of"] == first and "timing_of" not in rows[third]
    assert ([c["latency_ms"] for c in rows[second]["candidates"]]
            == [c["latency_ms"] for c in rows[first]["candidates"]])
    timed = len(blocks) - 1
    assert choice.record["timed_blocks"] == timed
    assert [p[:3] for p in progress] == [(i, timed, b.name) for i, b in enumerate(
        b for b in blocks if b.name != second)] + [(timed, timed, None)]
    assert progress[-1][3] == 1  # one block took an equal block's figures


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_timing_converts_to_tflite_as_the_export_does():
    """block_timing.tflite_bytes (a traced function, 4-5x faster to convert) gives the
    operations and outputs of TFLiteConverter.from_keras_model."""
    import contextlib
    import io

    import numpy as np
    import tensorflow as tf

    from pbkd_mpi.model.block_timing import tflite_bytes
    from pbkd_mpi.model.graph import find_blocks

    teacher = _bare_operation_teacher()
    block = find_blocks(teacher, "block")[1]
    model = _deployed(Candidate(replace(block, family=TEACHER), 1).model(teacher))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    x = np.random.default_rng(0).uniform(size=(3, *block.input_shape)).astype(np.float32)
    outputs, operations = [], []
    for blob in (tflite_bytes(model), reference):
        interpreter = tf.lite.Interpreter(model_content=blob)
        operations.append([op["op_name"] for op in interpreter._get_ops_details()])
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    assert operations[0] == operations[1] and "ADD" in operations[0]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    np.testing.assert_allclose(outputs[0], model.predict(x, verbose=0), atol=1e-4)


def test_a_block_is_timed_until_its_choice_is_settled(tiny_teacher, blocks, monkeypatch):
    """Rounds of every measure, QUICK_ROUNDS at a time, stop once the medians leave the
    choice in no doubt (the deciding candidates SETTLED_MARGIN off the min_speedup line),
    else when each measure's budget is spent; candidates after the choice count only as
    the fastest. Timers with fixed medians stand in for the clock."""
    import contextlib

    from pbkd_mpi.model import choice as choice_module
    from pbkd_mpi.model.choice import QUICK_ROUNDS, SETTLED_MARGIN, settled, time_candidates

    # Teacher, separable, low-rank, relative to the fastest; min_speedup 1.25.
    assert settled({"m": [1.0, 1.3, 1.2]}, 1.25)  # the teacher, fastest
    assert not settled({"m": [1.2, 1.3, 1.0]}, 1.25)  # the teacher, just inside the line
    assert settled({"m": [1.5, 1.0, 2.0]}, 1.25)  # the student; the teacher well outside
    assert not settled({"m": [1.4, 1.0, 2.0]}, 1.25)  # ... the teacher near the line
    # A later candidate counts as the fastest: 0.9 puts the chosen separable 1.11x off it.
    assert not settled({"m": [1.25 * SETTLED_MARGIN, 1.0, 0.9]}, 1.25)
    budget = 3 * QUICK_ROUNDS

    class Timer:
        def __init__(self, functions, input_shape, batch):
            self.done = 0

        def wants_more(self):
            return self.done < budget

        def run(self, rounds, budgeted=True):
            self.done = min(budget, self.done + rounds)
            made.append(self)

        def medians(self):
            return list(medians)

    @contextlib.contextmanager
    def runners(models, target):
        yield [None] * len(models)

    monkeypatch.setattr(choice_module, "InterleavedTimer", Timer)
    monkeypatch.setattr(choice_module, "model_runners", runners)
    student = load_job(None, ["student.latency_batches=[1, 8]"]).student
    found = candidates(blocks[0], 2, keep=True)
    for medians, rounds in (([1.0, 1.3, 1.5], QUICK_ROUNDS), ([1.2, 1.3, 1.0], budget)):
        made = []
        timings = time_candidates(tiny_teacher, blocks[0], found, student)
        assert set(timings) == {"tflite/1", "tflite/8", "keras-cpu/1", "keras-cpu/8"}
        assert {timer.done for timer in made} == {rounds}
