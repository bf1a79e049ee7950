"""Shared fixtures: a small generated data set and a small untrained teacher, built fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pbkd_mpi.mpi.devices import import_tensorflow


import_tensorflow()  # once, quietly, before any test touches Keras

REPO = Path(__file__).resolve().parents[1]
TINY_JOB = REPO / "jobs" / "tiny.toml"


@pytest.fixture(scope="session")
def tiny_dataset():
    from pbkd_mpi.config import DataConfig
    from pbkd_mpi.data.dataset import load_dataset

    return load_dataset(DataConfig(image_size=(16, 16), demo_train=300, demo_test=100), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dataset):
    import keras

    from pbkd_mpi.model.teacher import build_vgg_demo

    keras.utils.set_random_seed(1)
    return build_vgg_demo(tiny_dataset.image_shape, tiny_dataset.num_classes, (8, 8, 16, 16))


def run_mpi(ranks: int, args, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m pbkd_mpi ARGS` under mpiexec; a hang fails the test at `timeout`."""
    command = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "pbkd_mpi", *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or REPO)
