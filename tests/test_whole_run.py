"""The whole-run projection (schedule/whole_run.py) and `simulate --whole-run`."""

import json
import subprocess
import sys

import pytest

from pbkd_mpi.schedule.whole_run import PHASE_SCALING, project_run, sequential_share

from .conftest import REPO

MEASURED = {"load": 2.0, "teacher": 100.0, "blocks": 0.1, "cache": 10.0, "profile": 4.0,
            "distill": 120.0, "accept": 60.0, "chain": 150.0, "assemble": 4.0,
            "finetune": 140.0, "evaluate": 3.0}


def _makespan(workers):  # a perfectly divisible block phase of 240 s
    return 240.0 / workers


def test_the_projection_at_the_measured_workers_is_the_measured_run():
    table = project_run(MEASURED, 2, _makespan, [1, 2, 4])
    measured = sum(MEASURED[name] for name in PHASE_SCALING)
    assert table[2]["total_s"] == pytest.approx(measured)
    assert table[2]["phases_s"] == pytest.approx({n: MEASURED[n] for n in PHASE_SCALING})
    assert table[1]["speedup"] == pytest.approx(1.0)


def test_each_phase_scales_by_its_rule_and_amdahl_bounds_the_speedup():
    table = project_run(MEASURED, 2, _makespan, [1, 2, 4, 64])
    four = table[4]["phases_s"]
    assert four["cache"] == pytest.approx(10.0 * 2 / 4)  # shared by the workers
    assert four["finetune"] == pytest.approx(140.0 * 2 / 4)
    # Rank 0 computing too (a GPU of its own) makes one more rank at every count.
    with_root = project_run(MEASURED, 2, _makespan, [4], rank0_computes=True)[4]["phases_s"]
    assert with_root["finetune"] == pytest.approx(140.0 * 3 / 5)
    assert four["distill"] == pytest.approx(120.0 / 2)  # simulated, calibrated
    assert four["profile"] == pytest.approx(4.0 * 2 / 4)  # each worker times its share
    assert four["blocks"] == pytest.approx(0.1 * 2 / 4)  # each its blocks' candidates
    for name in ("accept", "chain", "assemble"):
        assert four[name] == MEASURED[name]
    speedups = [table[w]["speedup"] for w in (1, 2, 4, 64)]
    assert speedups == sorted(speedups)
    fixed = sum(MEASURED[n] for n, rule in PHASE_SCALING.items() if rule == "fixed")
    assert table[64]["speedup"] < table[1]["total_s"] / fixed  # Amdahl's bound
    assert table[64]["sequential_share"] > table[2]["sequential_share"]


def test_sequential_share_counts_the_phases_after_the_teacher():
    fixed = 60.0 + 150.0 + 4.0
    total = fixed + 0.1 + 4.0 + 10.0 + 120.0 + 140.0
    assert sequential_share(MEASURED) == pytest.approx(fixed / total)
    assert sequential_share({}) == 0.0


def test_simulate_whole_run_from_a_profile_and_a_report(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"workers": 2, "phases": MEASURED}))
    profile = REPO / "benchmarks" / "profiles" / "reference-profile.json"
    done = subprocess.run(
        [sys.executable, "-m", "pbkd_mpi", "simulate", str(profile), "--workers", "1,2,4",
         "--whole-run", "--phases", str(report), "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout)["whole_run"]
    assert set(table) == {"1", "2", "4"}
    assert table["2"]["total_s"] == pytest.approx(sum(MEASURED[n] for n in PHASE_SCALING))
    missing = subprocess.run(
        [sys.executable, "-m", "pbkd_mpi", "simulate", str(profile), "--whole-run",
         "--phases", str(tmp_path / "none.json")],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert missing.returncode == 2 and "--whole-run needs the measured phases" in (
        missing.stderr)


def test_the_chained_passs_parallel_part_scales_with_its_blocks_times():
    from pbkd_mpi.schedule.whole_run import longest_first_makespan

    assert longest_first_makespan([40, 20, 10, 10], 2) == 40
    assert longest_first_makespan([40, 20, 10, 10], 1) == 80
    assert longest_first_makespan([], 4) == 0
    # 150 s of chain: 60 s its parallel part (blocks of 40, 20, 20 s on 2 workers: 40 s
    # simulated, so calibrated by 1.5), 90 s inputs and the last block.
    chained = {"parallel_s": 60.0, "blocks": [
        {"seconds": 40.0, "parallel": True}, {"seconds": 20.0, "parallel": True},
        {"seconds": 20.0, "parallel": True}, {"seconds": 30.0}, {"skipped": "x"}]}
    table = project_run(MEASURED, 2, _makespan, [1, 2, 4], chained)
    assert table[2]["phases_s"]["chain"] == pytest.approx(150.0)
    assert table[1]["phases_s"]["chain"] == pytest.approx(90.0 + 80.0 * 1.5)
    assert table[4]["phases_s"]["chain"] == pytest.approx(90.0 + 40.0 * 1.5)  # longest
    # Only the chain's unchanged part counts as sequential.
    fixed = 60.0 + 90.0 + 4.0
    total = sum(MEASURED[name] for name in PHASE_SCALING)
    assert sequential_share(MEASURED, chained) == pytest.approx(fixed / total)
    assert table[2]["sequential_share"] == pytest.approx(fixed / total)

