import keras
import numpy as np
import pytest
from keras import layers

from pbkd_mpi.model.graph import find_blocks
from pbkd_mpi.model.students import build_student_model, initial_weights, with_family


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
    assert kinds[:3] == ["DepthwiseConv2D", "Conv2D", "BatchNormalization"]
    assert student.layers[2].kernel_size == (1, 1)  # pointwise
    assert student.count_params() < block.teacher_params
    if ending == "linear":
        assert len(kinds) == 3  # pre-activation target: the student ends linear
    else:
        assert len(kinds) == 4


def test_linear_student_can_produce_negative_values():
    (block,) = find_blocks(_model(1, "same", "linear"))
    student = build_student_model(block)
    out = student(np.random.default_rng(0).normal(size=(4, 9, 9, 6)).astype("float32"))
    assert float(np.min(out)) < 0


@pytest.mark.parametrize("multiplier", [1, 2])
def test_initialisation_is_the_best_separable_approximation(multiplier):
    model = _model(1, "same", "linear")
    (block,) = find_blocks(model)
    conv = model.get_layer("conv")
    student = build_student_model(block, multiplier)
    for name, arrays in initial_weights(block, model, multiplier).items():
        student.get_layer(name).set_weights(arrays)
    dw = student.get_layer("conv_student_dw").get_weights()[0]  # (3, 3, m * 6, 1): tiled
    pw = student.get_layer("conv_student_pw").get_weights()[0][0, 0]  # (m * 6, 12)
    effective = np.einsum("hwmc,mco->hwco", dw[..., 0].reshape(3, 3, multiplier, 6),
                          pw.reshape(multiplier, 6, 12))
    kernel = conv.kernel.numpy()
    error = np.linalg.norm(effective - kernel) / np.linalg.norm(kernel)
    # Exactly the truncated SVD per input channel: compare with numpy's own.
    expected = 0.0
    for c in range(6):
        s = np.linalg.svd(kernel[:, :, c, :].reshape(9, 12), compute_uv=False)
        expected += np.sum(s[multiplier:] ** 2)
    assert error == pytest.approx(np.sqrt(expected) / np.linalg.norm(kernel), rel=1e-4)
    # With the teacher's BN carried over, the student starts close to the teacher block.
    x = np.random.default_rng(0).normal(size=(16, 9, 9, 6)).astype("float32")
    teacher_block = keras.Model(model.inputs, model.get_layer("bn").output)
    target = teacher_block.predict(x, verbose=0)
    start = student.predict(x, verbose=0)
    relative = np.mean((start - target) ** 2) / np.var(target)
    assert relative < error ** 2 * 1.5 + 1e-3


def _residual_model():
    inputs = keras.Input((8, 8, 16))
    y = layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inputs)
    y = layers.Conv2D(16, 3, padding="same", name="c2")(y)
    out = layers.ReLU(name="out")(layers.Add(name="add")([inputs, y]))
    return keras.Model(inputs, layers.GlobalAveragePooling2D(name="gap")(out))


def test_segment_student_keeps_the_skip_connection_and_the_ending():
    (block,) = find_blocks(_residual_model(), "block")
    assert block.kind == "segment" and block.width == 16
    student = build_student_model(block)
    names = [layer.name for layer in student.layers]
    assert "out_student_add" in names and names[-1] == "out_student_act"
    assert student.count_params() < block.teacher_params
    # The Add takes the block input itself: the student starts near the identity map.
    add = student.get_layer("out_student_add")
    assert student.inputs[0] in add._inbound_nodes[0].input_tensors


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_inverted_residual_family_and_width_multiplier(granularity):
    from pbkd_mpi.model.students import with_family

    for block in find_blocks(_residual_model(), granularity):
        narrow = with_family(block, "inverted_residual", 0.5)
        assert narrow.width == block.width // 2 and narrow.family == "inverted_residual"
        student = build_student_model(narrow)
        kinds = [type(layer).__name__ for layer in student.layers[1:4]]
        assert kinds == ["Conv2D", "BatchNormalization", "ReLU"]  # the 1x1 expansion first
        assert student.get_layer(f"{block.name}_student_expand").filters == 8
        assert tuple(student.output.shape[1:]) == block.output_shape
        assert student.count_params() < block.teacher_params
        assert initial_weights(narrow, _residual_model()) == {}  # starts fresh
    with pytest.raises(ValueError, match="student family among"):
        with_family(block, "mobilenet")


def _relative_error(student, teacher_block, x):
    target = teacher_block(x)
    return float(np.mean((student(x) - target) ** 2) / np.mean(target ** 2))


@pytest.mark.parametrize("stride, padding, ending", [(1, "same", "relu"), (2, "valid", "swish")])
def test_low_rank_student_keeps_the_shape_and_starts_from_the_kernels_svd(
        stride, padding, ending, tmp_path):
    model = _model(stride, padding, ending)
    (found,) = find_blocks(model)
    block = with_family(found, "low_rank", depth_multiplier=1, target=0.3)
    student = build_student_model(block)
    assert tuple(student.output.shape[1:]) == block.output_shape
    reduce = student.get_layer("conv_student_reduce")
    assert reduce.strides == (stride, stride) and reduce.padding == padding
    rank_cost = 9 * 6 + 12  # one more rank: a 3x3x6 filter and a 12-wide pointwise row
    assert abs(student.count_params() - 0.3 * block.teacher_params) <= rank_cost
    teacher_block = keras.Model(model.input, model.get_layer(block.output_boundary).output)
    x = np.random.default_rng(1).normal(size=(32, 9, 9, 6)).astype("float32")
    fresh = _relative_error(student, teacher_block, x)
    for name, arrays in initial_weights(block, model).items():
        student.get_layer(name).set_weights(arrays)
    started = _relative_error(student, teacher_block, x)
    assert started < fresh, (started, fresh)  # a random kernel: a flat spectrum
    # The effective kernel is the rank-r truncated SVD of the (3x3x6) x 12 kernel matrix.
    effective = np.einsum("hwcr,ro->hwco", reduce.get_weights()[0],
                          student.get_layer("conv_student_pw").get_weights()[0][0, 0])
    kernel = model.get_layer("conv").kernel.numpy()
    sigma = np.linalg.svd(kernel.reshape(54, 12), compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(effective - kernel),
                               np.sqrt(np.sum(sigma[block.width:] ** 2)), rtol=1e-4)
    student.save(tmp_path / "student.keras")
    loaded = keras.saving.load_model(tmp_path / "student.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), student.predict(x, verbose=0),
                               atol=1e-5)


def test_low_rank_rank_doubles_with_the_depth_multiplier():
    (found,) = find_blocks(_model(1, "same", "relu"))
    block = with_family(found, "low_rank", depth_multiplier=2)
    narrow, wide = build_student_model(block, 2), build_student_model(block, 4)
    assert narrow.get_layer("conv_student_reduce").filters == 2 * block.width
    assert wide.get_layer("conv_student_reduce").filters == 4 * block.width
    assert narrow.count_params() < wide.count_params() and narrow.count_params() < (
        found.teacher_params)


def test_low_rank_segment_student_keeps_a_residual_blocks_shape():
    inputs = keras.Input((8, 8, 16))
    y = layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inputs)
    y = layers.Conv2D(16, 3, padding="same", name="c2")(y)
    x = layers.ReLU(name="out")(layers.Add(name="add")([inputs, y]))
    model = keras.Model(inputs, layers.Conv2D(8, 3, strides=2, name="tail")(x))
    block = next(b for b in find_blocks(model, "block") if b.name == "out")
    student = build_student_model(with_family(block, "low_rank", target=0.3))
    assert tuple(student.output.shape[1:]) == (8, 8, 16)
    assert "out_student_add" in {layer.name for layer in student.layers}
    assert student.count_params() < 0.4 * block.teacher_params


def test_a_separable_conv_becomes_a_low_rank_block_started_from_its_dense_kernel():
    from pbkd_mpi.model.selection import select_blocks
    from pbkd_mpi.model.students import dense_kernel

    inputs = keras.Input((8, 8, 32))
    x = layers.SeparableConv2D(64, 3, padding="same", use_bias=False, name="sep")(inputs)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(name="bn")(x))
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    (block,) = select_blocks(model, "layer", 2)  # a separable student would not be smaller
    assert (block.name, block.family, block.layers) == ("sep", "low_rank", ("sep", "bn", "relu"))
    student = build_student_model(block, 2)
    assert student.count_params() < block.teacher_params
    for name, arrays in initial_weights(block, model, 2).items():
        student.get_layer(name).set_weights(arrays)
    reduce = student.get_layer("sep_student_reduce").get_weights()[0]
    effective = np.einsum("hwcr,ro->hwco", reduce,
                          student.get_layer("sep_student_pw").get_weights()[0][0, 0])
    dense = dense_kernel(model.get_layer("sep"))
    sigma = np.linalg.svd(dense.reshape(9 * 32, 64), compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(effective - dense),
                               np.sqrt(np.sum(sigma[2 * block.width:] ** 2)), rtol=1e-4)


def test_dense_layers_on_feature_maps_are_pointwise_blocks_and_a_classifier_is_not():
    from pbkd_mpi.model.selection import select_blocks

    inputs = keras.Input((8, 8, 32))
    x = layers.Activation("gelu", name="gelu")(layers.Dense(128, name="expand")(inputs))
    x = layers.Dense(32, name="project")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, layers.Dense(10, name="classifier")(x))
    blocks = {b.name: b for b in select_blocks(model, "layer", 2)}
    assert set(blocks) == {"expand", "project"}  # ConvNeXt's MLP, not the head
    expand = blocks["expand"]
    assert expand.family == "low_rank" and expand.layers == ("expand", "gelu")
    assert expand.final_activation == "gelu" and expand.kernel_size == (1, 1)
    student = build_student_model(expand, 2)
    assert tuple(student.output.shape[1:]) == (8, 8, 128)
    for name, arrays in initial_weights(expand, model, 2).items():
        student.get_layer(name).set_weights(arrays)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 32)).astype("float32")
    teacher_block = keras.Model(model.input, model.get_layer("gelu").output)
    assert _relative_error(student, teacher_block, x) < 1.0


def _sequence_model():
    """Conv1D blocks as audio and time-series networks have them: a strided wide-kernel
    conv, a residual pair, a PReLU ending."""
    inputs = keras.Input((40, 3))
    x = layers.Conv1D(16, 7, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.PReLU(shared_axes=[1], name="stem_act")(layers.BatchNormalization(name="bn")(x))
    y = layers.Conv1D(16, 5, padding="same", activation="relu", name="c1")(x)
    y = layers.Conv1D(16, 5, padding="same", name="c2")(y)
    x = layers.ReLU(name="out")(layers.Add(name="add")([x, y]))
    x = layers.Conv1D(24, 3, strides=2, name="tail")(x)
    return keras.Model(inputs, layers.GlobalAveragePooling1D(name="gap")(x))


@pytest.mark.parametrize("family", ["separable", "low_rank", "inverted_residual"])
def test_conv1d_blocks_get_1d_students_of_the_same_shape_started_from_the_kernel(
        family, tmp_path):
    model = _sequence_model()
    x = np.random.default_rng(2).normal(size=(16, 40, 3)).astype("float32")
    for granularity in ("layer", "block"):
        for found in find_blocks(model, granularity):
            block = with_family(found, family, depth_multiplier=2, target=0.4)
            student = build_student_model(block, 2)
            assert tuple(student.output.shape[1:]) == block.output_shape, block.name
            convs = [layer for layer in student.layers if hasattr(layer, "kernel_size")]
            assert convs and all(len(layer.kernel_size) == 1 for layer in convs)
            assert student.count_params() < block.teacher_params, block.name
            if block.kind == "conv" and block.family != "inverted_residual":
                assert convs[0].strides == block.strides
                teacher_block = keras.Model(
                    model.input if block.input_boundary == "__input__"
                    else model.get_layer(block.input_boundary).output,
                    model.get_layer(block.output_boundary).output)
                inputs = teacher_block.input.shape[1:]
                sample = np.random.default_rng(3).normal(size=(16, *inputs)).astype("float32")
                fresh = _relative_error(student, teacher_block, sample)
                for name, arrays in initial_weights(block, model, 2).items():
                    student.get_layer(name).set_weights(arrays)
                assert _relative_error(student, teacher_block, sample) < fresh, block.name
    (stem,) = [b for b in find_blocks(model) if b.name == "stem"]
    assert stem.kernel_size == (7,) and stem.strides == (2,) and stem.final_activation == "prelu"
    student = build_student_model(with_family(stem, family, depth_multiplier=2), 2)
    student.save(tmp_path / "student.keras")
    loaded = keras.saving.load_model(tmp_path / "student.keras")
    sample = x  # the stem's input is the model's
    np.testing.assert_allclose(loaded.predict(sample, verbose=0),
                               student.predict(sample, verbose=0), atol=1e-5)
