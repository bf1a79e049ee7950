"""The 224 px path under mpiexec -n 2: a keras.applications ResNet50 (weights=None) cut
after its second residual block, an image folder of JPEGs larger than 224 px (resized
bilinear as read), `scale = "caffe"`, within a 3,000 MB budget per rank."""

import json

import keras
import numpy as np
from PIL import Image

from pbkd_mpi.data.demo import make_shapes

from ..conftest import run_mpi

BUDGET_MB = 3000  # measured peaks 1.3 and 2.4 GB; the watch warns past 2.7 GB


def _image_folder(root):
    """64 training and 16 test JPEGs of 250x310 px, the demo's shapes, 4 classes."""
    for split, count, seed in (("train", 64, 0), ("test", 16, 1)):
        images, labels = make_shapes(count, (250, 310), seed=seed, classes=4)
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:03d}.jpg", quality=90)


def _resnet50_stem(path):
    """ResNet50 to conv2_block2_out (56x56x256), then a 4-class head: 159 k parameters,
    54 MB of activations a sample, as the full network's first stage has at 224 px."""
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(weights=None, include_top=False,
                                       input_shape=(224, 224, 3))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(
        base.get_layer("conv2_block2_out").output)
    outputs = keras.layers.Dense(4, activation="softmax", name="predictions")(x)
    keras.Model(base.input, outputs, name="resnet50_stem").save(path)


def test_a_keras_applications_teacher_at_224_px_within_its_budget(tmp_path):
    _image_folder(tmp_path / "images")
    _resnet50_stem(tmp_path / "teacher.keras")
    run_dir = tmp_path / "run"
    result = run_mpi(2, [
        "run", "--run-dir", run_dir,
        "--set", f"teacher.source={tmp_path / 'teacher.keras'}",
        "--set", f"data.source={tmp_path / 'images'}",
        "--set", "data.image_size=[224, 224]", "--set", "data.scale=caffe",
        "--set", "blocks.granularity=block",
        "--set", "distill.epochs=2", "--set", "distill.batch_size=16",
        "--set", "distill.chained_epochs=1",  # the chained inputs at 224 px, briefly
        "--set", "finetune.epochs=1", "--set", "finetune.batch_size=16",
        "--set", "accept.max_drop=1.0",  # an untrained teacher: acceptance would be noise
        # Every block trained (an untrained teacher's block may be timed as fast as its
        # student): the memory of each phase at 224 px is what is tested.
        "--set", "student.keep_teacher=false",
        "--set", "export.tflite=none", "--set", "export.saved_model=false",
        "--set", "export.latency_repeats=3",
        "--set", "schedule.profile=false",  # 34 s here; distill's steps use as much memory
        "--set", f"run.memory_budget_mb={BUDGET_MB}",
    ], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok"
    assert report["data"]["image_shape"] == [224, 224, 3]
    blocks = {b["name"]: b for b in report["blocks"]}
    assert set(blocks) == {"conv1_conv", "conv2_block1_out", "conv2_block2_out"}
    for block in blocks.values():
        assert block["student_params"] < block["teacher_params"]
        assert np.isfinite(block["val_mse"])  # 58 images, 2 epochs: trained, not learned
    # The estimate counts one fine-tuning batch's activations (16 x 54 MB), and every rank
    # stayed inside its budget through every phase, without a warning.
    memory = report["memory_budget"]
    assert memory["budget_mb"] == BUDGET_MB
    assert 16 * 50 < memory["needs_mb"]["activations"] < 16 * 60
    peaks = [rank["peak_rss_mb"] for rank in report["energy"]["per_rank"]]
    assert len(peaks) == 2 and max(peaks) < BUDGET_MB, peaks
    assert "resident memory" not in result.stderr
    # The worker opened rank 0's index of the folder instead of listing it again.
    assert "opened rank 0's index (58 training images)" in (
        run_dir / "logs" / "rank-1.log").read_text()
    student = keras.saving.load_model(run_dir / "student.keras")
    assert student.input_shape == (None, 224, 224, 3)
    assert report["student"]["params"] < report["teacher"]["params"]
