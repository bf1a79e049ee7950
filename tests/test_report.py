"""report.md, its pictures and the comparison of two runs, from hand-made reports."""

import copy
import json
import subprocess
import sys

import pytest
from PIL import Image

from pbkd_mpi.output.report import compare, render_report


from .conftest import REPO


def _report(run_dir, workers, makespan, accuracy, energy=None):
    block = {"name": "conv1", "layers": ["conv1", "bn1", "relu1"], "rank": 1,
             "seconds": makespan, "start_s": 0.0, "end_s": makespan, "reused": False,
             "train_mse": 0.1, "val_mse": 0.1, "initial_val_mse": 0.3, "target_variance": 0.5,
             "epochs": 2, "best_epoch": 2, "student_params": 100, "student_flops": 1000,
             "history": {"loss": [0.3, 0.2], "val_loss": [0.25, 0.1]},
             "resumed_from_epoch": 0, "teacher_params": 400, "teacher_flops": 5000,
             "input_shape": [8, 8, 3], "output_shape": [8, 8, 4], "final_activation": "relu"}
    second = dict(block, name="conv2", rank=workers, start_s=0.0, end_s=makespan / 2,
                  seconds=makespan / 2)
    report = {
        "status": "ok", "run_dir": str(run_dir), "workers": workers,
        "data": {"num_classes": 10},
        "teacher": {"source": "t.keras", "params": 1000, "flops": 9000, "accuracy": 0.9},
        "student": {"params": 500, "flops": 4000, "accuracy_merged": 0.5,
                    "accuracy_finetuned": accuracy, "path": "student.keras"},
        "replaced": {"teacher_params": 800, "student_params": 200, "teacher_flops": 10000,
                     "student_flops": 2000, "param_ratio": 0.25, "flop_ratio": 0.2},
        "blocks": [block, second], "failed_blocks": [],
        "phases": {"load": 1.0, "distill": makespan, "finetune": 10.0},
        "distill": {"makespan_s": makespan, "sum_task_s": 1.5 * makespan, "reused_blocks": 0,
                    "coordinator_cpu_fraction": 0.01},
        "finetune": {"epochs": 2, "best_epoch": 2, "val_accuracy_before": 0.5,
                     "val_accuracy": 0.85, "history": {"accuracy": [0.7, 0.8],
                                                       "val_accuracy": [0.8, 0.85]}},
        "wall_s": makespan + 11.0,
    }
    if energy is not None:
        report["energy"] = energy
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report))
    return report


def test_comparison_arithmetic(tmp_path):
    a = _report(tmp_path / "a", 1, 100.0, 0.80, {"gpu_j": 1000.0, "cpu_j": 500.0})
    b = _report(tmp_path / "b", 4, 25.0, 0.81, {"gpu_j": 900.0, "cpu_j": 300.0})
    c = compare(a, b)
    assert c["distill_speedup"] == pytest.approx(4.0)
    assert c["wall_speedup"] == pytest.approx(111.0 / 36.0)
    assert c["energy_ratio"] == pytest.approx(1200.0 / 1500.0)
    assert c["accuracy_difference"] == pytest.approx(0.01)
    assert c["phases"]["distill"] == [100.0, 25.0]
    unmeasured = compare(_report(tmp_path / "c", 1, 10.0, 0.8), b)
    assert unmeasured["energy_ratio"] is None


def test_report_pictures_are_valid_pngs_linked_from_the_markdown(tmp_path):
    report = _report(tmp_path / "run", 2, 40.0, 0.8)
    markdown = render_report(tmp_path / "run", report).read_text()
    for name in ("timeline.png", "block_costs.png", "block_losses.png", "finetune.png"):
        path = tmp_path / "run" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        assert f"]({name})" in markdown


def test_a_fully_reused_run_draws_no_timeline(tmp_path):
    report = _report(tmp_path / "run", 2, 40.0, 0.8)
    for block in report["blocks"]:
        block.update(reused=True, start_s=None, end_s=None)
    markdown = render_report(tmp_path / "run", copy.deepcopy(report)).read_text()
    assert "timeline.png" not in markdown and "block_costs.png" in markdown


def test_report_command_redraws_and_compares(tmp_path):
    _report(tmp_path / "a", 1, 100.0, 0.80)
    _report(tmp_path / "b", 2, 60.0, 0.79)
    run = [sys.executable, "-m", "pbkd_mpi", "report"]
    redraw = subprocess.run([*run, str(tmp_path / "a")], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert redraw.returncode == 0, redraw.stderr
    assert (tmp_path / "a" / "report.md").exists() and (tmp_path / "a" / "timeline.png").exists()
    text = subprocess.run([*run, str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "distillation speedup B vs A: 1.67x" in text.stdout
    assert "student accuracy B - A:      -1.00 points" in text.stdout
    assert "energy B / A:                not measured" in text.stdout
    missing = subprocess.run([*run, str(tmp_path / "nope")], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
    assert missing.returncode == 2 and "has no report.json" in missing.stderr
