"""Teachers as users write them (tests/zoo.py), each planned and distilled under
mpiexec -n 3 from a class-sorted image folder to report.json with every export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from ..conftest import REPO, run_mpi
from ..zoo import SITE, mixed_precision_teacher, train_briefly, tutorial_teacher

JOB = """\
[teacher]
source = "{teacher}"
[data]
source = "photos"
image_size = [16, 16]
scale = "none"
[blocks]
granularity = "{granularity}"
[student]
keep_teacher = false
latency_batches = [1]
[distill]
epochs = 2
batch_size = 32
[schedule]
profile = false
[accept]
max_drop = 1.0
[finetune]
epochs = 1
batch_size = 32
[export]
tflite = "both"
latency_repeats = 3
[run]
dir = "run-{name}"
"""
TRAINING_ONLY = ("Random", "Dropout", "GaussianNoise")  # parts of their class names


def _training_only(model) -> set[str]:
    return {layer.name for layer in model.layers
            if any(part in type(layer).__name__ for part in TRAINING_ONLY)}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """{name: job file}: the folder (4 classes, sorted on disk), and each teacher trained
    briefly and saved as its user would."""
    from pbkd_mpi.config import DataConfig
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.data.demo import write_image_folder

    root = tmp_path_factory.mktemp("zoo")
    write_image_folder(root / "photos", 800, 200, (16, 16), classes=4, noise=0.05)
    data = load_dataset(DataConfig(source=str(root / "photos"), image_size=(16, 16),
                                   scale="none"), seed=0)
    x, y = np.asarray(data.x_train), data.y_train
    teachers = {"tutorial.keras": tutorial_teacher(x[:200], 4),
                "mixed.h5": mixed_precision_teacher((16, 16, 3), 4)}
    jobs = {}
    for file, model in teachers.items():
        train_briefly(model, x, y).save(root / file)
        name = file.split(".")[0]
        jobs[name] = root / f"{name}.toml"
        jobs[name].write_text(JOB.format(teacher=file, name=name,
                                         granularity="block" if name == "tutorial" else "layer"))
    return jobs


# The custom layer is registered on every rank the documented way: a sitecustomize.py on
# PYTHONPATH (docs/troubleshooting.md, "A teacher with custom layers").
ENV = {"PYTHONPATH": os.pathsep.join([str(SITE), str(REPO)])}


@pytest.mark.parametrize("name", ["tutorial", "mixed"])
def test_a_users_teacher_plans_and_distils_to_every_export(zoo, name):
    job = zoo[name]
    planned = subprocess.run([sys.executable, "-m", "pbkd_mpi", "plan", str(job), "--json"],
                             capture_output=True, text=True, timeout=300, cwd=job.parent,
                             env={**os.environ, **ENV})
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(planned.stdout)
    assert plan["blocks"], plan
    result = run_mpi(3, ["run", job], timeout=420, env=ENV, cwd=job.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    run_dir = job.parent / f"run-{name}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["problems"] == []
    exports = report["deployment"]["exports"]
    assert set(exports) == {"keras", "saved_model", "tflite_float32", "tflite_int8"}
    for kind in ("keras", "saved_model", "tflite_float32"):
        assert exports[kind]["class_agreement"] == 1.0, exports[kind]
    assert exports["tflite_float32"]["ops"] == exports["tflite_int8"]["ops"] == "builtins"
    assert exports["tflite_int8"]["class_agreement"] >= 0.8
    # The deployed student keeps no layer that only acts in training; the trainable one does.
    removed = report["deployment"]["training_only_removed"]
    deployed = keras.saving.load_model(run_dir / "student.keras")
    assert not _training_only(deployed)
    kept = _training_only(keras.saving.load_model(run_dir / "student-assembled.keras"))
    assert kept == set(removed["student"]) and any(n.startswith("dropout") for n in kept)
    assert set(removed["teacher"]) == kept
    if name == "tutorial":  # augmentation (nested), noise, both dropouts; custom layers kept
        # By class: Keras numbers unnamed layers per process, and other tests make some.
        assembled = keras.saving.load_model(run_dir / "student-assembled.keras")
        assert {"RandomFlip", "RandomTranslation", "RandomContrast", "GaussianNoise",
                "SpatialDropout2D", "Dropout"} <= {type(layer).__name__ for layer in
                                                   assembled.layers if layer.name in kept}
        # The residual block around swish3 was replaced whole; swish_head is the teacher's.
        names = {layer.name for layer in deployed.layers}
        assert "swish_head" in names and not {"swish3", "conv3", "conv4"} & names
        assert any("conv3" in b["layers"] and "swish3" in b["layers"]
                   for b in report["blocks"] if b["replaced"])
        assert any(type(layer).__name__ == "Normalization" for layer in deployed.layers)
    else:  # computed in float32: TFLite has no float16 conv kernels
        assert all(layer.dtype_policy.compute_dtype == "float32" for layer in deployed.layers)
