"""The quality gate: whether a finished run's student meets the job's `[gate]` bars.

A nightly pipeline that distills a new teacher cannot read report.md; it reads the exit
code. Each bar the job sets is checked against report.json's figures; a run whose student
misses one keeps its report and files (the report says which bar and by how much) and
exits with EXIT_GATE (3). `python -m pbkd_mpi check RUN` applies a gate to a finished run.
"""

from __future__ import annotations

from pbkd_mpi.config import GateConfig
from pbkd_mpi.errors import EXIT_GATE, EXIT_OK, EXIT_PROBLEM

# Accuracies are counts over a split: a drop of exactly the limit (0.86 - 0.83) must pass
# though it is 0.030000000000000027 in floating point.
_TOLERANCE = 1e-9


def check_gate(gate: GateConfig, report: dict) -> dict:
    """{"passed": bool, "bars": [{"name", "limit", "value", "passed"}, ...]} for every bar
    `gate` sets (none set: passed, no bars)."""
    teacher, student = report["teacher"], report["student"]
    bars = []
    if gate.max_accuracy_drop < 1.0:
        drop = teacher["accuracy"] - student["accuracy_finetuned"]
        bars.append(_bar("max_accuracy_drop", gate.max_accuracy_drop, drop,
                         drop <= gate.max_accuracy_drop + _TOLERANCE))
    if gate.min_param_reduction > 0.0:
        reduction = 1.0 - student["params"] / teacher["params"]
        bars.append(_bar("min_param_reduction", gate.min_param_reduction, reduction,
                         reduction >= gate.min_param_reduction - _TOLERANCE))
    if gate.max_latency_ratio > 0.0:
        deployment = report["deployment"]
        if not deployment["teacher"]["latency_ms"]:  # the latency step failed: no pass
            bars.append(_bar("max_latency_ratio (Keras on the CPU)", gate.max_latency_ratio,
                             None, False))
        for batch, teacher_ms in deployment["teacher"]["latency_ms"].items():
            ratio = deployment["student"]["latency_ms"][batch] / teacher_ms
            bars.append(_bar(f"max_latency_ratio ({batch}, Keras on the CPU)",
                             gate.max_latency_ratio, ratio,
                             ratio <= gate.max_latency_ratio + _TOLERANCE))
    return {"passed": all(bar["passed"] for bar in bars), "bars": bars}


def _bar(name: str, limit: float, value: float, passed: bool) -> dict:
    return {"name": name, "limit": limit,
            "value": None if value is None else round(float(value), 6), "passed": passed}


def failed_bars(verdict: dict) -> str:
    """The bars missed, for one line: `max_accuracy_drop 0.0412 > 0.01; ...`."""
    return "; ".join(
        f"{bar['name']} not measured" if bar["value"] is None else
        f"{bar['name']} {bar['value']:.4g} {'<' if 'min_' in bar['name'] else '>'} "
        f"{bar['limit']:.4g}" for bar in verdict["bars"] if not bar["passed"])


def exit_code(gate: GateConfig, report: dict) -> int:
    """A finished run's exit code: EXIT_GATE when the student missed a bar (judged again
    with `gate`), else EXIT_PROBLEM when a step after the student failed (report
    `problems`) and the gate does not allow it, else EXIT_OK."""
    if not check_gate(gate, report)["passed"]:
        return EXIT_GATE
    if report.get("problems") and not gate.allow_problems:
        return EXIT_PROBLEM
    return EXIT_OK
