import pytest

from pbkd_mpi.errors import UserError
from pbkd_mpi.mpi import faults


def test_fault_forms_parse():
    assert faults.parse("raise:conv1, nan:conv2,signal:USR1:2.5,kill:2:3,hang:1:0.5") == [
        ("raise", "conv1"), ("nan", "conv2"), ("signal", "USR1:2.5"), ("kill", "2:3"),
        ("hang", "1:0.5")]
    assert faults.parse("") == []


@pytest.mark.parametrize("text", ["explode:conv1", "raise:", "signal:KILL:3", "signal:USR1:x",
                                  "signal:USR1", "kill:conv1:3", "hang:2"])
def test_bad_fault_forms_are_refused(text):
    with pytest.raises(UserError, match="PBKD_FAULT expects"):
        faults.parse(text)


def test_active_reads_the_environment(monkeypatch):
    monkeypatch.setenv("PBKD_FAULT", "raise:conv3")
    assert faults.active("raise", "conv3") and not faults.active("raise", "conv1")
