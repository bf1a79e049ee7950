"""Bad input that only shows when teacher, data and run directory meet."""

import pytest

from pbkd_mpi.errors import UserError


def test_teacher_and_data_must_agree_on_classes(tiny_teacher, tiny_dataset):
    import dataclasses

    from pbkd_mpi.model.teacher import check_teacher_fits_data

    check_teacher_fits_data(tiny_teacher, tiny_dataset)
    five = dataclasses.replace(tiny_dataset, num_classes=5)
    with pytest.raises(UserError, match=r"output has shape \(None, 10\), but the data set has 5"):
        check_teacher_fits_data(tiny_teacher, five)
    labels = tiny_dataset.y_test.copy()
    labels[0] = 12
    with pytest.raises(UserError, match=r"y_test holds label 12, outside the teacher's 10"):
        check_teacher_fits_data(tiny_teacher, dataclasses.replace(tiny_dataset, y_test=labels))


def test_an_unwritable_run_directory_is_refused(tmp_path):
    from pbkd_mpi.config import load_job
    from pbkd_mpi.run_dir import prepare_run_dir

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="Cannot write to the run directory"):
        prepare_run_dir(load_job(None, run_dir=blocker / "run"))


def test_a_run_directory_of_another_job_is_refused_unless_fresh(tmp_path):
    from pbkd_mpi.config import load_job
    from pbkd_mpi.run_dir import prepare_run_dir

    first = load_job(None, ["distill.epochs=3"], run_dir=tmp_path / "run")
    run_dir = prepare_run_dir(first)
    (run_dir / "blocks" / "conv1-abc.npz").write_bytes(b"x")
    (run_dir / "notes.txt").write_text("the user's own file")
    # The same job, or one that only changes fine-tuning or threads, may resume here.
    prepare_run_dir(load_job(None, ["distill.epochs=3", "finetune.epochs=1", "run.threads=1"],
                             run_dir=run_dir))
    # So may the chained pass's epochs: its results have keys of their own.
    prepare_run_dir(load_job(None, ["distill.epochs=3", "distill.chained_epochs=2"],
                             run_dir=run_dir))
    other = load_job(None, ["distill.epochs=5"], run_dir=run_dir)
    with pytest.raises(UserError, match=r"holds a run of a different job: distill.epochs was 3, "
                                        r"is now 5\..*--fresh"):
        prepare_run_dir(other)
    prepare_run_dir(other, fresh=True)
    assert not (run_dir / "blocks" / "conv1-abc.npz").exists()
    assert (run_dir / "notes.txt").exists()  # --fresh removes only the tool's own files
    assert load_job(run_dir / "job.toml") == other


@pytest.mark.parametrize("name, content, message", [
    ("teacher.keras", b"not a zip archive", r"is not a Keras model file: a \.keras model is a "
                                            r"zip archive .* starts with b'not a zip"),
    ("teacher.h5", b"GIF89a an image", r"a \.h5 model is an HDF5 file"),
    ("teacher.pt", b"torch weights", r"is not a \.keras or \.h5 file \(received a \.pt path\)"),
    ("absent.keras", None, r"does not exist\. Expected a \.keras or \.h5 model file"),
])
def test_a_teacher_file_that_is_not_a_keras_model_is_refused(tmp_path, name, content, message):
    from pbkd_mpi.model.teacher import load_model_file

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_model_file(str(path))
