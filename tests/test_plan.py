import json
import subprocess
import sys

import pytest

from pbkd_mpi.model.selection import block_table


from .conftest import REPO, TINY_JOB


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "pbkd_mpi", "plan", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_block_table_totals_add_up(tiny_teacher):
    table = block_table(tiny_teacher)
    assert [b["name"] for b in table["blocks"]] == ["conv1", "conv2", "conv3", "conv4"]
    for key in ("teacher_params", "student_params", "teacher_flops", "student_flops"):
        assert table["totals"][key] == sum(b[key] for b in table["blocks"])
    assert table["totals"]["student_params"] < 0.4 * table["totals"]["teacher_params"]


def test_plan_command_json_for_a_job_and_for_a_saved_teacher(tiny_teacher, tmp_path):
    result = _plan(TINY_JOB, "--json")
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)  # stdout is the JSON alone
    assert len(table["blocks"]) == 4 and set(table["totals"]) == {
        "teacher_params", "student_params", "teacher_flops", "student_flops"}
    # Timing's progress on stderr; TFLite's own lines on neither stream.
    assert "timing candidates: block 1/" in result.stderr
    assert "block(s) timed in" in result.stderr.splitlines()[-1]
    assert "Created TensorFlow Lite" not in result.stderr + result.stdout
    assert table["students"]["timed_blocks"] == len(table["students"]["blocks"])
    for name in ("t.keras", "t.h5"):  # the native format and the legacy HDF5 one
        path = tmp_path / name
        tiny_teacher.save(path)
        result = _plan("--teacher", path)
        assert result.returncode == 0, result.stderr
        assert "conv4" in result.stdout and "total" in result.stdout
    # This 16 px teacher's convs are timed about as fast as their students (its blocks
    # cost the runtime's per-call overhead): plan says which keep the teacher's layers,
    # and says so when all do, rather than refusing as `run` does.
    assert "teacher's block" in result.stdout
    kept = [line for line in result.stdout.splitlines()
            if line.startswith("  conv") and ": teacher's block" in line]
    assert (len(kept) == 4) is ("student would be the teacher" in result.stdout)


def test_plan_refuses_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "not_a_model.keras"
    path.write_text("hello")
    result = _plan("--teacher", path)
    assert result.returncode == 2
    # What was expected and what was received: the format, the size and the first bytes.
    assert "is not a Keras model file" in result.stderr
    assert "zip archive" in result.stderr and "(5 bytes) starts with b'hello'" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_command_takes_the_granularity_from_the_job(tmp_path):
    result = _plan(TINY_JOB, "--json", "--set", "blocks.granularity=stage")
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    # The tiny teacher: two convs, a pool, two convs: one stage per spatial size.
    assert [b["layers"] for b in table["blocks"]] == [
        ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2"],
        ["conv3", "bn3", "relu3", "conv4", "bn4", "relu4"]]
    assert all(b["kind"] == "segment" and b["params_ratio"] < 1 for b in table["blocks"])


def test_explicit_blocks_from_the_job(tiny_teacher):
    from pbkd_mpi.config import BlocksConfig, job_from_dict, validate_job
    from pbkd_mpi.errors import UserError
    from pbkd_mpi.model.selection import granularity_of

    pairs = granularity_of(BlocksConfig(explicit=("conv2:relu2", "conv3:relu4")))
    assert pairs == [("conv2", "relu2"), ("conv3", "relu4")]
    table = block_table(tiny_teacher, 1, pairs)
    assert [b["name"] for b in table["blocks"]] == ["conv2", "relu4"]
    assert granularity_of(BlocksConfig(granularity="block")) == "block"
    with pytest.raises(UserError, match='blocks.explicit expects entries "first_layer:last_layer"'):
        validate_job(job_from_dict({"blocks": {"explicit": ["conv2"]}}))


def test_family_overrides_pick_a_family_per_block(tiny_teacher):
    from pbkd_mpi.config import job_from_dict, validate_job
    from pbkd_mpi.errors import UserError

    table = block_table(tiny_teacher, 1, "layer", "separable", 1.0,
                        ("conv3=inverted_residual", "conv*=separable"))
    assert {b["name"]: b["family"] for b in table["blocks"]} == {
        "conv1": "separable", "conv2": "separable", "conv3": "inverted_residual",
        "conv4": "separable"}
    with pytest.raises(UserError, match='family_overrides expects entries "pattern=family"'):
        validate_job(job_from_dict({"student": {"family_overrides": ["conv3=mobile"]}}))


def test_plan_granularity_option_overrides_the_job():
    layer = json.loads(_plan(TINY_JOB, "--json").stdout)
    stage = _plan(TINY_JOB, "--json", "--granularity", "stage")
    assert stage.returncode == 0, stage.stderr
    stage = json.loads(stage.stdout)
    assert len(stage["blocks"]) < len(layer["blocks"])
    assert stage["totals"]["teacher_params"] == layer["totals"]["teacher_params"]
    bad = _plan(TINY_JOB, "--granularity", "layers")
    assert bad.returncode == 2 and "invalid choice: 'layers'" in bad.stderr
