import json
import subprocess
import sys

from pbkd_mpi.plan import block_table

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
    table = json.loads(result.stdout)
    assert len(table["blocks"]) == 4 and set(table["totals"]) == {
        "teacher_params", "student_params", "teacher_flops", "student_flops"}
    for name in ("t.keras", "t.h5"):  # the native format and the legacy HDF5 one
        path = tmp_path / name
        tiny_teacher.save(path)
        result = _plan("--teacher", path)
        assert result.returncode == 0, result.stderr
        assert "conv4" in result.stdout and "total" in result.stdout


def test_plan_refuses_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "not_a_model.keras"
    path.write_text("hello")
    result = _plan("--teacher", path)
    assert result.returncode == 2
    assert "could not be loaded as a Keras model" in result.stderr
    assert "Traceback" not in result.stderr
