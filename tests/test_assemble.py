import keras
import numpy as np

from pbkd_mpi.model.assemble import assemble_student, copy_block, rewrite
from pbkd_mpi.model.graph import find_blocks
from pbkd_mpi.model.students import build_student_model, layer_weights


def test_identity_reassembly_reproduces_the_teacher(tiny_teacher):
    blocks = find_blocks(tiny_teacher)
    same = rewrite(tiny_teacher, blocks,
                   lambda block, tensor: copy_block(tiny_teacher, block, tensor),
                   layer_weights(tiny_teacher))
    # Copies, never the teacher's own layer objects.
    teacher_layers = {id(layer) for layer in tiny_teacher.layers}
    assert not any(id(layer) in teacher_layers for layer in same.layers)
    x = np.random.default_rng(0).uniform(size=(8, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(same.predict(x, verbose=0), tiny_teacher.predict(x, verbose=0),
                               atol=1e-5)


def test_student_has_trained_blocks_and_the_teachers_other_weights(tiny_teacher):
    blocks = find_blocks(tiny_teacher)
    trained = {}
    for block in blocks[:3]:  # the last block stays the teacher's
        model = build_student_model(block)
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([w + 0.5 for w in layer.get_weights()])
        trained[block.name] = layer_weights(model)
    before = [w.copy() for w in tiny_teacher.get_weights()]
    student = assemble_student(tiny_teacher, blocks, trained)
    names = [layer.name for layer in student.layers]
    assert "conv1" not in names and "conv1_student_dw" in names and "conv4" in names
    for block_name, per_layer in trained.items():
        for layer_name, weights in per_layer.items():
            for got, want in zip(student.get_layer(layer_name).get_weights(), weights):
                np.testing.assert_array_equal(got, want)
    for name in ("conv4", "bn4", "classifier"):
        for got, want in zip(student.get_layer(name).get_weights(),
                             tiny_teacher.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    assert student.count_params() < tiny_teacher.count_params()
    # Training the student must not touch the teacher.
    student.get_layer("classifier").set_weights(
        [w * 0 for w in student.get_layer("classifier").get_weights()])
    for got, want in zip(tiny_teacher.get_weights(), before):
        np.testing.assert_array_equal(got, want)


def test_student_saves_and_loads(tiny_teacher, tmp_path):
    blocks = find_blocks(tiny_teacher)
    student = assemble_student(tiny_teacher, blocks,
                               {b.name: layer_weights(build_student_model(b)) for b in blocks})
    student.save(tmp_path / "s.keras")
    loaded = keras.saving.load_model(tmp_path / "s.keras")
    x = np.random.default_rng(1).uniform(size=(4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), student.predict(x, verbose=0),
                               atol=1e-6)
