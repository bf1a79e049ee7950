"""Real architectures as teachers: keras.applications models (untrained, 32x32 inputs, 10
classes), the demo teacher and a Functional model with a nested Sequential backbone.

Each model is built once per session (ResNet50 and DenseNet121 take seconds) and only tiny
batches are predicted, to keep the suite fast on two cores.
"""

import inspect

import keras
import numpy as np
import pytest
from keras import layers

from pbkd_mpi.model.assemble import assemble_student, copy_block, rewrite
from pbkd_mpi.model.cost import shapes_only
from pbkd_mpi.model.graph import GRANULARITIES, boundary_tensor, find_blocks, flatten_model
from pbkd_mpi.model.selection import block_table, block_table_of, plan_warnings, select_blocks
from pbkd_mpi.model.students import build_student_model, layer_weights, student_cost


APPLICATIONS = ("VGG16", "VGG19", "ResNet50", "ResNet50V2", "MobileNetV2", "DenseNet121")
NAMES = (*APPLICATIONS, "demo", "nested")
SIZE = 32  # the smallest input every one of them accepts
MULTIPLIER = 2  # the job default


def _nested_backbone_model():
    """A backbone (conv stem and a residual block) used as a layer, plus a head."""
    backbone_in = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="bb_conv1")(backbone_in)
    x = layers.BatchNormalization(name="bb_bn1")(x)
    x = layers.ReLU(name="bb_relu1")(x)
    y = layers.Conv2D(8, 3, padding="same", activation="relu", name="bb_conv2")(x)
    y = layers.Conv2D(8, 3, padding="same", name="bb_conv3")(y)
    x = layers.ReLU(name="bb_out")(layers.Add(name="bb_add")([x, y]))
    backbone = keras.Model(backbone_in, x, name="backbone")
    stem = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        layers.Conv2D(3, 3, padding="same", activation="relu", name="pre_conv"),
    ], name="pre")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = backbone(stem(inputs))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="head_conv")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, layers.Dense(10, name="classifier")(x), name="nested")


def _build(name):
    keras.utils.set_random_seed(0)
    if name == "demo":
        from pbkd_mpi.model.teacher import build_vgg_demo

        return build_vgg_demo((SIZE, SIZE, 3), 10, (16, 16, 32, 32))
    if name == "nested":
        return _nested_backbone_model()
    return getattr(keras.applications, name)(weights=None, input_shape=(SIZE, SIZE, 3),
                                              classes=10)


@pytest.fixture(scope="session")
def teachers():
    return {}


@pytest.fixture(params=NAMES)
def teacher(request, teachers):
    if request.param not in teachers:
        teachers[request.param] = _build(request.param)
    return teachers[request.param]


def _inputs(n=2):
    return np.random.default_rng(0).uniform(size=(n, SIZE, SIZE, 3)).astype("float32")


def _check_blocks(model, blocks):
    """Every student smaller than its block and of its output shape (build_student_model
    raises otherwise), the boundaries tensors of the flat teacher (a layer's or a bare
    operation's output), no layer in two blocks."""
    assert blocks
    with shapes_only():
        flat = flatten_model(model, weights=False)
    for block in blocks:
        assert student_cost(block, MULTIPLIER)[0] < block.teacher_params, block.name
        for name in (block.input_boundary, block.output_boundary):
            assert tuple(boundary_tensor(flat, name).shape[1:]) in (block.input_shape,
                                                                    block.output_shape)
    names = [n for block in blocks for n in block.layers]
    assert len(names) == len(set(names)), "blocks overlap"


@pytest.mark.parametrize("name", ["demo", "nested"])  # keras.applications: below
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_blocks_at_every_granularity_with_smaller_students(teachers, name, granularity):
    teachers.setdefault(name, _build(name))
    _check_blocks(teachers[name], select_blocks(teachers[name], granularity, MULTIPLIER))


def _identity_check(teacher, granularity):
    blocks = find_blocks(teacher, granularity)
    same = rewrite(teacher, blocks, lambda block, tensor: copy_block(teacher, block, tensor),
                   layer_weights(flatten_model(teacher)))
    teacher_layers = {id(layer) for layer in flatten_model(teacher).layers}
    assert not any(id(layer) in teacher_layers for layer in same.layers)
    x = _inputs()
    np.testing.assert_allclose(same.predict(x, verbose=0), teacher.predict(x, verbose=0),
                               atol=1e-5)


def test_identity_reassembly_reproduces_the_teacher(teacher):
    _identity_check(teacher, "block")


@pytest.mark.parametrize("name", ["ResNet50V2", "MobileNetV2", "demo", "nested"])
@pytest.mark.parametrize("granularity", ["layer", "stage"])
def test_identity_reassembly_at_other_granularities(teachers, name, granularity):
    # Conv groups inside residual branches (layer) and stages spanning padding and
    # several segments: the cases whose subgraphs differ most from `block`.
    teachers.setdefault(name, _build(name))
    _identity_check(teachers[name], granularity)


def test_student_is_smaller_and_saves_and_loads(teacher, tmp_path):
    blocks = select_blocks(teacher, "block", MULTIPLIER)
    keras.utils.set_random_seed(0)
    weights = {b.name: layer_weights(build_student_model(b, MULTIPLIER)) for b in blocks}
    student = assemble_student(teacher, blocks, weights, MULTIPLIER)
    assert student.count_params() < teacher.count_params()
    assert tuple(student.output.shape) == tuple(teacher.output.shape)
    student.save(tmp_path / "student.keras")
    loaded = keras.saving.load_model(tmp_path / "student.keras")
    x = _inputs()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), student.predict(x, verbose=0),
                               atol=1e-5)


def test_residual_architectures_get_their_residual_blocks(teachers):
    for name in ("ResNet50", "ResNet50V2", "DenseNet121", "MobileNetV2"):
        teachers.setdefault(name, _build(name))
    resnet = {b.name: b for b in find_blocks(teachers["ResNet50"], "block")}
    # 16 bottleneck blocks, each from its input to the ReLU after the Add, plus the stem.
    assert len(resnet) == 17 and "conv2_block1_out" in resnet and "conv5_block3_out" in resnet
    assert resnet["conv3_block1_out"].strides == (2, 2)
    assert resnet["conv3_block2_out"].input_boundary == "conv3_block1_out"
    assert resnet["conv3_block2_out"].final_activation == "relu"
    # ResNet50V2 is pre-activation: its blocks end at the Add, linear.
    v2 = {b.name: b for b in find_blocks(teachers["ResNet50V2"], "block")}
    assert v2["conv3_block2_out"].final_activation == "linear"
    # DenseNet121: 6 + 12 + 24 + 16 conv blocks, each ending in its concatenation (the
    # last one of each dense block with the transition's BN and ReLU after it).
    dense = [b for b in find_blocks(teachers["DenseNet121"], "block")
             if any(name.endswith("_concat") for name in b.layers)]
    assert len(dense) == 58
    assert dense[5].name == "pool2_relu" and dense[5].final_activation == "relu"
    assert dense[0].output_shape[-1] == dense[0].input_shape[-1] + 32
    # MobileNetV2: the inverted residual blocks with a skip connection end at the Add, linear.
    mobile = [b for b in find_blocks(teachers["MobileNetV2"], "block") if b.name.endswith("_add")]
    assert len(mobile) == 10 and all(b.final_activation == "linear" for b in mobile)
    # The other inverted-residual blocks have no skip connection, so each of their layers
    # is a cut point; the depthwise conv binds its expansion and projection into one block.
    chained = {b.name: b for b in select_blocks(teachers["MobileNetV2"], "block", MULTIPLIER)}
    separable = [name for name, b in chained.items() if b.family == "separable"]
    assert len(separable) == 17  # the stem conv and block_1 ... block_16
    # The first unit (depthwise and projection, no expansion) has no smaller separable
    # student: the dense low-rank pair replaces it.
    assert chained["expanded_conv_project_BN"].family == "low_rank"
    first = chained["block_1_project_BN"]
    assert first.layers[0] == "block_1_expand" and first.strides == (2, 2)
    assert first.final_activation == "linear" and first.input_boundary == "expanded_conv_project_BN"


def test_stage_blocks_merge_while_spatial_size_stays(teachers):
    teachers.setdefault("ResNet50", _build("ResNet50"))
    stages = [b for b in find_blocks(teachers["ResNet50"], "stage") if b.kind == "segment"]
    assert [b.name for b in stages] == ["conv2_block3_out", "conv3_block4_out",
                                        "conv4_block6_out", "conv5_block3_out"]
    assert [b.repeats for b in stages] == [3, 4, 6, 3]  # bottleneck blocks per stage
    student = build_student_model(stages[2], MULTIPLIER)
    assert "conv4_block6_out_student_r6_add" in {layer.name for layer in student.layers}
    assert stages[2].strides == (2, 2) and student_cost(stages[2], MULTIPLIER)[0] < (
        stages[2].teacher_params)


def test_plan_table_for_a_residual_teacher(teachers):
    teachers.setdefault("ResNet50", _build("ResNet50"))
    table = block_table(teachers["ResNet50"], MULTIPLIER, "block")
    for key in ("teacher_params", "student_params", "teacher_flops", "student_flops"):
        assert table["totals"][key] == sum(row[key] for row in table["blocks"])
    assert all(0 < row["params_ratio"] < 1 for row in table["blocks"])
    assert table["totals"]["student_flops"] < table["totals"]["teacher_flops"]


def test_a_graph_with_bare_operations_plans_and_counts_them_as_weightless():
    """ConvNeXt adds its residuals with `x + y`: a keras.ops Add in the graph's operations,
    not a Layer, without count_params; planning ended in an AttributeError."""
    from pbkd_mpi.model.cost import layer_params

    keras.utils.set_random_seed(0)
    model = flatten_model(keras.applications.ConvNeXtTiny(
        weights=None, input_shape=(64, 64, 3), classes=10))
    operations = [op for op in model.operations if not hasattr(op, "count_params")]
    assert operations and all(layer_params(op) == 0 for op in operations)
    table = block_table(model, MULTIPLIER, "block")
    assert table["blocks"] and all(0 < row["params_ratio"] < 1 for row in table["blocks"])
    assert table["totals"]["teacher_params"] == sum(row["teacher_params"]
                                                    for row in table["blocks"])
    # Blocks end at such an Add: the cache reads its output, and the student replaces it.
    blocks = select_blocks(model, "block", MULTIPLIER)
    ends = [b for b in blocks if b.output_boundary in {op.name for op in operations}]
    assert ends
    cut = keras.Model(model.inputs, [boundary_tensor(model, b.output_boundary) for b in ends])
    assert [tuple(t.shape[1:]) for t in cut.outputs] == [b.output_shape for b in ends]
    weights = {b.name: layer_weights(build_student_model(b, MULTIPLIER)) for b in ends}
    student = assemble_student(model, ends, weights, MULTIPLIER)
    x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32")
    assert student.predict(x, verbose=0).shape == (2, 10)


@pytest.mark.parametrize("name", ["VGG16", "ResNet50", "MobileNetV2", "EfficientNetB0"])
def test_a_parameter_target_sizes_every_student(teachers, name):
    teachers.setdefault(name, _build(name))
    blocks = select_blocks(teachers[name], "block", MULTIPLIER, target=0.3)
    totals = block_table_of(blocks, MULTIPLIER)["totals"]
    assert 0.27 <= totals["student_params"] / totals["teacher_params"] <= 0.33
    # Single convs (VGG16's, the stems) can meet a target only in the low-rank form.
    assert all(b.family == "low_rank" for b in blocks if b.kind == "conv")


def test_depthwise_networks_get_a_block_per_pointwise_conv_and_a_plan_per_granularity():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNet(weights=None, input_shape=(64, 64, 3), classes=10)
    layer = select_blocks(model, "layer", MULTIPLIER)
    assert len(layer) == 14  # the stem and the 13 pointwise convs; not the classifier
    assert all(b.family == "low_rank" for b in layer[1:])
    assert "conv_preds" not in {b.name for b in layer}
    stage = select_blocks(model, "stage", MULTIPLIER)  # no separable student was smaller
    assert stage and all(student_cost(b, MULTIPLIER)[0] < b.teacher_params for b in stage)
    none = select_blocks(model, "layer", MULTIPLIER, fallback="none")
    assert [b.name for b in none] == ["conv1"]


def test_plan_warns_about_a_block_too_big_and_a_student_too_small():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="small")(inputs)
    x = layers.Conv2D(256, 3, padding="same", activation="relu", name="big")(x)
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    blocks = select_blocks(model, "layer", 1)
    warnings = plan_warnings(blocks, 1, max_share=0.5, min_ratio=0.2)
    assert len(warnings) == 2 and all("'big'" in w for w in warnings)
    assert "holds 99% of the parameters" in warnings[0] and "blocks.explicit" in warnings[0]
    assert "student.min_ratio" in warnings[1]
    assert plan_warnings(blocks, 1, max_share=1.0, min_ratio=0.0) == []


def test_a_stage_over_the_size_limit_is_cut_back_into_its_blocks(teachers):
    teachers.setdefault("ResNet50", _build("ResNet50"))
    whole = {b.name for b in select_blocks(teachers["ResNet50"], "stage", MULTIPLIER)}
    cut = {b.name for b in select_blocks(teachers["ResNet50"], "stage", MULTIPLIER,
                                         max_share=0.4)}
    assert "conv5_block3_out" in whole and "conv5_block3_out" in cut
    assert "conv5_block1_out" not in whole and "conv5_block1_out" in cut


def _constructors() -> list[str]:
    return sorted(name for name, fn in vars(keras.applications).items()
                  if inspect.isfunction(fn) and name[0].isupper())


# The smallest input each constructor accepts; 32 px unless named here.
MIN_SIZE = {"Xception": 71, "InceptionV3": 75, "InceptionResNetV2": 75}
# One model of each kind no other test covers: depthwise (MobileNet), MBConv with SE and
# hard-swish (MobileNetV3Small), separable convs (Xception), NAS cells (NASNetMobile),
# ConvNeXt (grouped 7x7 convs, Dense pointwise layers, LayerScale).
MODERN = ("MobileNet", "MobileNetV3Small", "Xception", "NASNetMobile", "ConvNeXtTiny")


def test_the_constructor_list_is_keras_applications_own():
    names = _constructors()
    assert len(names) >= 35 and {"ConvNeXtXLarge", "EfficientNetV2L", "NASNetLarge",
                                 *MODERN, *APPLICATIONS} <= set(names)


@pytest.mark.parametrize("name", _constructors())
def test_every_keras_application_plans_at_every_granularity(name):
    """Built without drawing weights (planning reads shapes): the largest, ConvNeXtXLarge
    with 348 M parameters, builds in about a second and plans in a few."""
    size = MIN_SIZE.get(name, 32)
    with shapes_only():
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                                  classes=10)
    covered = {}
    for granularity in GRANULARITIES:
        blocks = select_blocks(model, granularity, MULTIPLIER, max_share=0.9)
        _check_blocks(model, blocks)
        table = block_table_of(blocks, MULTIPLIER)
        warned = " ".join(plan_warnings(blocks, MULTIPLIER, 0.9, 0.02))
        covered[granularity] = total = table["totals"]["teacher_params"]
        for block in blocks:
            if block.teacher_params > 0.9 * total:
                assert repr(block.name) in warned, (granularity, block.name)
    # Layer by layer, the pointwise, separable and Dense-as-1x1 convs of the modern models
    # are blocks too: they cover most of what whole blocks do (the classifier head stays
    # outside both; SE gates are dense layers on pooled features, inside blocks but never
    # blocks alone).
    if name in MODERN:
        assert covered["layer"] > 0.6 * covered["block"], covered  # less the SE gates


@pytest.mark.parametrize("name", ["MobileNetV3Small", "ConvNeXtTiny"])
def test_the_teachers_own_blocks_are_built_alone_where_they_end_at_bare_operations(name):
    """The latency objective times each teacher block alone (model/choice.Candidate): a
    block of MobileNetV3Small (hard sigmoid `x + 3`, `x * y`) or ConvNeXtTiny (the residual
    `x + y`) that holds or ends at a bare keras.ops call is copied with it (plan ended in
    KeyError 'add_16' at 96 px, MobileNetV3Small 'add_34'). Shapes only: seconds each."""
    from dataclasses import replace

    from pbkd_mpi.model.choice import TEACHER, Candidate

    with shapes_only():
        model = flatten_model(getattr(keras.applications, name)(
            weights=None, input_shape=(SIZE, SIZE, 3), classes=10))
        operations = {op.name for op in model.operations if not isinstance(op, layers.Layer)}
        holding = 0
        for granularity in ("block", "stage"):
            for block in select_blocks(model, granularity, MULTIPLIER, max_share=0.9):
                alone = Candidate(replace(block, family=TEACHER), 1).model(model)
                assert tuple(alone.output_shape[1:]) == block.output_shape, block.name
                holding += bool(operations & set(block.layers))
    assert holding
