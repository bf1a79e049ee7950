"""atomic.py: a file appears whole or not at all."""

import os

import numpy as np
import pytest

from pbkd_mpi.atomic import (atomic_directory, atomic_path, stale_temporaries, temporary_name,
                             write_text)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.npz"
    write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.npz"]


def test_the_temporary_keeps_the_suffix_that_writers_look_at(tmp_path):
    target = tmp_path / "conv1-abc.npz"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npz" and tmp.name.startswith(".")
        np.savez(tmp, x=np.arange(3))  # savez appends .npz when the name lacks it
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv1-abc.npz"]


def test_temporaries_of_killed_writers_are_found_and_others_are_not(tmp_path):
    target = tmp_path / "train-00003.h5"
    killed = temporary_name(target).with_name(".train-00003.tmp999.h5")
    killed.write_bytes(b"half a shard")
    (tmp_path / ".train-00004.tmp999.h5").write_bytes(b"another shard's")
    assert list(stale_temporaries(target)) == [killed]
    assert temporary_name(target).name == f".train-00003.tmp{os.getpid()}.h5"


def test_a_directory_is_replaced_whole_or_kept(tmp_path):
    target = tmp_path / "saved_model"
    with atomic_directory(target) as tmp:
        (tmp / "variables").mkdir(parents=True)
        (tmp / "saved_model.pb").write_text("first")
    assert (target / "saved_model.pb").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            tmp.mkdir()
            (tmp / "saved_model.pb").write_text("half")
            raise RuntimeError("killed mid-export")
    assert (target / "saved_model.pb").read_text() == "first"  # the old one, whole
    with atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "saved_model.pb").write_text("second")
    assert (target / "saved_model.pb").read_text() == "second"
    assert not (target / "variables").exists()  # nothing of the old one mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved_model"]
