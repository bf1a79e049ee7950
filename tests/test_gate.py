"""The quality gate against a report's figures."""

from pbkd_mpi.config import GateConfig
from pbkd_mpi.gate import check_gate, failed_bars
from pbkd_mpi.output.report import _gate_lines


def _report():
    return {"teacher": {"accuracy": 0.86, "params": 1000},
            "student": {"accuracy_finetuned": 0.83, "params": 400},
            "deployment": {"teacher": {"latency_ms": {"batch_1": 2.0, "batch_32": 10.0}},
                           "student": {"latency_ms": {"batch_1": 3.0, "batch_32": 9.0}}}}


def test_no_bar_set_passes():
    assert check_gate(GateConfig(), _report()) == {"passed": True, "bars": []}


def test_each_bar_is_measured_and_judged():
    verdict = check_gate(GateConfig(max_accuracy_drop=0.02, min_param_reduction=0.5,
                                    max_latency_ratio=1.2), _report())
    bars = {bar["name"]: bar for bar in verdict["bars"]}
    assert bars["max_accuracy_drop"]["value"] == 0.03 and not bars["max_accuracy_drop"]["passed"]
    assert bars["min_param_reduction"]["value"] == 0.6 and bars["min_param_reduction"]["passed"]
    assert not bars["max_latency_ratio (batch_1, Keras on the CPU)"]["passed"]  # 1.5
    assert bars["max_latency_ratio (batch_32, Keras on the CPU)"]["passed"]  # 0.9
    assert not verdict["passed"]
    assert failed_bars(verdict) == ("max_accuracy_drop 0.03 > 0.02; max_latency_ratio "
                                    "(batch_1, Keras on the CPU) 1.5 > 1.2")
    assert check_gate(GateConfig(max_accuracy_drop=0.03, min_param_reduction=0.6),
                      _report())["passed"]  # the limits themselves pass


def test_the_report_shows_the_gate():
    verdict = check_gate(GateConfig(min_param_reduction=0.9), _report())
    text = "\n".join(_gate_lines(verdict))
    assert "## Quality gate" in text and "**failed** (the job exited 3)" in text
    assert "| min_param_reduction | 0.9 | 0.6 | **missed** |" in text
    assert _gate_lines({"passed": True, "bars": []}) == []
