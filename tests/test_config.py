import dataclasses
from pathlib import Path

import pytest

from pbkd_mpi.config import Job, load_job
from pbkd_mpi.errors import UserError
from pbkd_mpi.run_dir import write_job_toml


REPO = Path(__file__).resolve().parents[1]


def test_demo_job_file_spells_out_the_built_in_defaults(monkeypatch):
    monkeypatch.chdir(REPO)  # the built-in job's run directory is under the current one
    defaults = Job()
    expected = dataclasses.replace(defaults, run=dataclasses.replace(
        defaults.run, dir=str(REPO / defaults.run.dir)))
    assert load_job(REPO / "jobs" / "demo.toml") == expected == load_job(None)


def test_paths_resolve_against_the_job_files_folder_and_the_command_lines_against_cwd(
        tmp_path, monkeypatch):
    """A job runs the same from anywhere; the run's job.toml holds absolute paths."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    job_file = project / "job.toml"
    job_file.write_text('[teacher]\nsource = "models/cnn.keras"\n[data]\n'
                        'source = "../data/images"\n[run]\ndir = "runs/a"\n')
    monkeypatch.chdir(elsewhere)
    job = load_job(job_file)
    assert job.teacher.source == str(project / "models" / "cnn.keras")
    assert job.data.source == str(tmp_path / "data" / "images")  # normalised, no ".."
    assert job.run.dir == str(project / "runs" / "a")
    given = load_job(job_file, ["data.source=mine.h5", "teacher.source=vgg_demo"],
                     run_dir="out")
    assert given.data.source == str(elsewhere / "mine.h5") and given.run.dir == str(
        elsewhere / "out")
    assert given.teacher.source == "vgg_demo"  # a built-in name, not a path
    assert load_job(job_file, ["data.source=demo"]).data.source == "demo"
    assert load_job(job_file, ["data.source=/abs/x.npz"]).data.source == "/abs/x.npz"


def test_every_job_file_in_jobs_is_valid():
    for path in (REPO / "jobs").glob("*.toml"):
        assert isinstance(load_job(path), Job), path


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[distill]\nepoch = 3\n")
    with pytest.raises(UserError, match=r"Unknown key distill.epoch .*Did you mean 'epochs'\?"):
        load_job(path)


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[distil]\nepochs = 3\n")
    with pytest.raises(UserError, match=r"Unknown section \[distil\].*'distill'"):
        load_job(path)


@pytest.mark.parametrize("override, message", [
    ("distill.epochs=three", r"distill.epochs expects an integer, received 'three'"),
    ("distill.epochs=0", r"distill.epochs expects a value >= 1, received 0"),
    ("data.val_fraction=0.9", r"data.val_fraction expects a value >= 0.0 and <= 0.5"),
    ("cache.dtype=float64", r"cache.dtype expects one of 'float16', 'float32'"),
    ("teacher.widths=[8, 'a']", r"teacher.widths expects a list of int"),
    ("data.image_size=[4, 4]", r"data.image_size expects \[height, width\], each at least 8"),
    ("distill", r"Expected --set section.key=value"),
])
def test_bad_values_name_the_key_the_expectation_and_the_value(override, message):
    with pytest.raises(UserError, match=message):
        load_job(None, [override])


def test_overrides_and_run_dir_apply():
    job = load_job(None, ["distill.epochs=2", "data.source=/data/imgs", "teacher.widths=[4, 8]"],
                   run_dir="/tmp/x")
    assert job.distill.epochs == 2
    assert job.data.source == "/data/imgs"
    assert job.teacher.widths == (4, 8)
    assert job.run.dir == "/tmp/x"
    assert job.distill.learning_rate == Job().distill.learning_rate


def test_integers_are_accepted_for_floats_and_not_the_reverse():
    assert load_job(None, ["distill.learning_rate=1"]).distill.learning_rate == 1.0
    with pytest.raises(UserError, match="expects an integer"):
        load_job(None, ["distill.epochs=1.5"])


def test_job_written_to_the_run_directory_loads_back_identically(tmp_path):
    job = load_job(None, ["distill.epochs=2", "data.source=some dir/with \"quotes\""])
    write_job_toml(job, tmp_path / "job.toml")
    assert load_job(tmp_path / "job.toml") == job


def test_missing_or_broken_job_file(tmp_path):
    with pytest.raises(UserError, match="Cannot read the job file"):
        load_job(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[distill\n")
    with pytest.raises(UserError, match="is not valid TOML"):
        load_job(broken)


def test_job_is_frozen():
    with pytest.raises(Exception):
        Job().distill.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("overrides, message", [
    (["data.kind=sequences"], r"data.kind = \"sequences\" expects data.source to be an .npz"),
    (["data.kind=sequences", "data.source=/d/x.npz"],
     r"expects teacher.source to be your Conv1D model.*'vgg_demo'"),
    (["data.kind=sequences", "data.source=/d/x.h5", "teacher.source=/m/t.keras",
      "cache.views=2"], r"cache.views expects 0 for data.kind = \"sequences\".*received 2"),
])
def test_sequences_need_the_users_arrays_and_teacher_and_no_image_views(overrides, message):
    with pytest.raises(UserError, match=message):
        load_job(None, overrides)
    assert load_job(None, ["data.kind=sequences", "data.source=/d/x.h5",
                           "teacher.source=/m/t.keras"]).data.kind == "sequences"
