"""Bad input that only shows when teacher, data and run directory meet."""

import pytest

from pbkd_mpi.errors import UserError


def test_teacher_and_data_must_agree_on_classes(tiny_teacher, tiny_dataset):
    import dataclasses

    from pbkd_mpi.teacher import check_teacher_fits_data

    check_teacher_fits_data(tiny_teacher, tiny_dataset)
    five = dataclasses.replace(tiny_dataset, num_classes=5)
    with pytest.raises(UserError, match=r"output has shape \(None, 10\), but the data set has 5"):
        check_teacher_fits_data(tiny_teacher, five)
    labels = tiny_dataset.y_test.copy()
    labels[0] = 12
    with pytest.raises(UserError, match=r"y_test holds label 12, outside the teacher's 10"):
        check_teacher_fits_data(tiny_teacher, dataclasses.replace(tiny_dataset, y_test=labels))


def test_an_unwritable_run_directory_is_refused(tmp_path):
    from pbkd_mpi.pipeline import prepare_run_dir

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="Cannot write to the run directory"):
        prepare_run_dir(str(blocker / "run"))
