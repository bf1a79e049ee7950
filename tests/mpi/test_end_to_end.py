"""The whole pipeline under real MPI: mpiexec -n 2 and -n 3 on the tiny job, and failures."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from pbkd_mpi.distill.checkpoint import load_state


from ..conftest import REPO, TINY_JOB, run_mpi


# Stages a failure test does not look at: profiling, acceptance's wider retraining, exports.
QUICK = ["--set", "schedule.profile=false", "--set", "accept.max_drop=1.0",
         "--set", "export.saved_model=false", "--set", "export.tflite=none"]


def _check_report(run_dir, ranks, all_workers_busy=True):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok"
    assert report["workers"] == ranks - 1
    blocks = report["blocks"]
    assert [b["name"] for b in blocks] == ["conv1", "conv2", "conv3", "conv4"]
    # Every block trained on a worker rank, and all workers got work when there is enough.
    assert all(1 <= b["rank"] < ranks for b in blocks)
    if all_workers_busy:
        assert {b["rank"] for b in blocks} == set(range(1, ranks))
    for b in blocks:
        assert b["student_params"] < b["teacher_params"]
        assert b["param_ratio"] == pytest.approx(b["student_params"] / b["teacher_params"])
        assert b["seconds"] > 0 and np.isfinite(b["val_mse"])
        assert b["reused"] or b["start_s"] < b["end_s"]
        # The student block learned: better than predicting the target's mean.
        assert b["val_mse"] < b["target_variance"]
    assert report["replaced"]["param_ratio"] <= 0.40
    # The student is the teacher less what its replaced blocks saved, to the parameter and
    # the FLOP (acceptance may keep a block the teacher's or retrain it wider: on 200
    # validation samples that decision is noise, so it is not fixed here; a wider student
    # is still smaller than its teacher block).
    replaced = [b for b in blocks if b["replaced"]]
    assert replaced
    for key in ("params", "flops"):
        assert all(b[f"student_{key}"] < (0.5 if b["accept"]["decision"] == "accepted" else 1)
                   * b[f"teacher_{key}"] for b in replaced)
        saved = sum(b[f"teacher_{key}"] - b[f"student_{key}"] for b in replaced)
        assert report["teacher"][key] - report["student"][key] == saved
    # The tiny job has 4 classes (chance 0.25); measured: teacher 0.67, merged student 0.40,
    # fine-tuned student 0.78. A skipped or faked stage lands near chance.
    chance = 1 / report["data"]["num_classes"]
    assert report["teacher"]["accuracy"] > 2 * chance
    assert report["student"]["accuracy_merged"] > 1.3 * chance
    assert report["student"]["accuracy_finetuned"] > 2 * chance
    for key in ("load", "blocks", "cache", "distill", "assemble", "finetune"):
        assert report["phases"][key] >= 0
    # Honest selection: the test split is read once, by the final evaluation.
    assert report["data"]["test_split_reads"] == 1
    # Fine-tuned by the workers alone: on CPU rank 0 trains no block tasks, and beside
    # workers that fill the cores it would slow every step.
    assert report["finetune"]["identical_weights"] and report["finetune"]["ranks"] == ranks - 1
    # Worker-seconds: a block split over k workers (the scheduler splits a lone block when
    # workers would idle) kept k of them busy. A block acceptance retrained wider shows its
    # second run, which is not part of the distillation phase's schedule.
    tasks = {t["name"]: t for t in report["schedule"]["tasks"]}
    assert set(tasks) == {b["name"] for b in blocks if not b["reused"]}
    first_runs = [b for b in blocks
                  if not b["reused"] and b["accept"]["decision"] != "accepted_wider"]
    for b in first_runs:
        assert b["seconds"] == pytest.approx(tasks[b["name"]]["measured_s"], abs=0.05)
    assert report["distill"]["sum_task_s"] == pytest.approx(sum(
        tasks[n]["measured_s"] * len(tasks[n]["ranks"]) for n in tasks))
    if tasks:  # a run that reused every block has a distillation phase of moments: no ratio
        assert report["distill"]["coordinator_cpu_fraction"] < 0.25
    for model in ("teacher", "student"):  # measured, so positive; files exist, so sized
        assert all(v > 0 for v in report["deployment"][model]["latency_ms"].values())
        assert report["deployment"][model]["file_bytes"] > 0
    energy = report["energy"]  # this machine has no GPU and no RAPL: said, not invented
    assert energy["method"] == "not measured" and energy["gpu_j"] is None
    assert energy["cpu_s"] > 0 and [r["rank"] for r in energy["per_rank"]] == list(range(ranks))
    student = keras.saving.load_model(run_dir / "student.keras")
    kinds = {type(layer).__name__ for layer in student.layers}
    separable = any(b["replaced"] and b["family"] == "separable" for b in blocks)
    assert ("DepthwiseConv2D" in kinds) is separable
    # The saved student is the deployable one: every BN after a conv folded into it.
    assert "BatchNormalization" not in kinds
    assert report["deployment"]["folded_batchnorm"]["layers"] > 0
    # Replaced blocks' teacher layers are gone; a block kept the teacher's keeps its own.
    assert {layer.name for layer in student.layers} & {"conv1", "conv2", "conv3", "conv4"} \
        == {b["name"] for b in blocks if not b["replaced"]}
    # The default objective: each block trained the first of its candidates timed in
    # TFLite and Keras: the published student unless another is min_speedup (1.25) times
    # faster relative to the fastest (jobs/tiny.toml: batch 1, no teacher's block).
    students = report["students"]
    assert students["objective"] == "latency" and students["target"] == "cpu"
    assert "TFLite" in students["runtime"] and "Keras" in students["runtime"]
    assert students["batches"] == [1]
    assert "worker rank(s) at once" in students["timed_on"]  # not on rank 0
    for block, row in zip(blocks, students["blocks"]):
        first = row["candidates"][0]
        relative = {c["published"]: c["relative_time"] for c in row["candidates"]}
        assert len(relative) == 2 and block["name"] == row["name"]
        assert first["published"] == (relative[False] * 1.25 > relative[True])
        # `accept` names the last student tried: the first one only when it was accepted
        # (a wider retrain comes second, kept or not).
        if block["accept"]["decision"] == "accepted":
            assert (block["family"], block["width"], block["accept"]["depth_multiplier"]) == (
                first["family"], first["width"], first["depth_multiplier"])
    assert "## Student choice" in (run_dir / "report.md").read_text()
    assert (run_dir / "report.md").read_text().startswith("# Distillation report")
    _check_keys_documented(report)
    return report


def _check_logs(run_dir, report):
    """Every rank wrote its own log: rank 0 the teacher's training when it trained it,
    workers their tasks with per-epoch losses."""
    ranks = report["workers"] + 1
    assert sorted(p.name for p in (run_dir / "logs").glob("*.log")) == [
        f"rank-{r}.log" for r in range(ranks)]
    trained = "teacher: epoch 1:" in (run_dir / "logs" / "rank-0.log").read_text()
    assert trained is report["teacher"]["trained_here"]
    for block in report["blocks"]:
        text = (run_dir / "logs" / f"rank-{block['rank']}.log").read_text()
        assert f"task {block['name']}: started" in text
        assert f"task {block['name']}: epoch 1: loss" in text
        assert f"task {block['name']}: done in" in text
        assert list((run_dir / "tb" / "blocks" / block["name"]).glob("events.out.tfevents.*"))
    assert list((run_dir / "tb" / "finetune").glob("events.out.tfevents.*"))
    import tensorflow as tf

    name = report["blocks"][0]["name"]
    # The student kept is the one trained last (a wider retrain writes a second file).
    events = max((run_dir / "tb" / "blocks" / name).glob("events.out.tfevents.*"),
                 key=lambda path: path.stat().st_mtime)
    scalars = {(e.step, v.tag): float(tf.make_ndarray(v.tensor))
               for e in tf.compat.v1.train.summary_iterator(str(events)) for v in e.summary.value}
    assert scalars[(1, "val_loss")] == pytest.approx(report["blocks"][0]["history"]["val_loss"][0])


def _check_keys_documented(report):
    documented = (REPO / "docs" / "report.md").read_text()
    keys = set(report) | {f"teacher.{k}" for k in report["teacher"]} | {
        f"student.{k}" for k in report["student"]} | set(report["blocks"][0]) | {
        f"distill.{k}" for k in report["distill"]} | set(report["phases"])
    missing = sorted(k for k in keys if f"`{k}`" not in documented)
    assert not missing, f"report keys missing from docs/report.md: {missing}"


def _run_tiny(ranks, run_dir, teacher_trained_here=True):
    started = time.monotonic()
    # A bar the tiny student meets (it keeps at most 0.40 of the replaced parameters).
    result = run_mpi(ranks, ["run", TINY_JOB, "--run-dir", run_dir,
                             "--set", "gate.min_param_reduction=0.1"], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert "report:" in result.stdout and str(run_dir) in result.stdout
    assert "Traceback" not in result.stderr
    # Plain lines for files: no terminal control characters, no TensorFlow start-up noise.
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.stdout + result.stderr)
    assert "cuda" not in (result.stdout + result.stderr).lower()
    report = _check_report(run_dir, ranks)
    assert report["gate"]["passed"] and [bar["name"] for bar in report["gate"]["bars"]] == [
        "min_param_reduction"]
    assert report["teacher"]["trained_here"] is teacher_trained_here
    _check_logs(run_dir, report)
    return report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny job from scratch with 3 ranks; the failure tests start from its teacher and
    cache (`_warm_run_dir`), so that each of them spends its time on what it tests."""
    run_dir = tmp_path_factory.mktemp("tiny-3-ranks") / "run"
    return run_dir, _run_tiny(3, run_dir)


def _warm_run_dir(tiny_run, tmp_path, blocks=()):
    """A new run directory holding the tiny run's trained teacher, activation cache and
    choice of students, and its finished results of `blocks` (reused by a run with the
    same distill settings): no job file (a test may change distill settings), no report."""
    source, _ = tiny_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for teacher in source.glob("teacher-*.keras"):
        shutil.copy2(teacher, run_dir / teacher.name)
    shutil.copytree(source / "cache", run_dir / "cache")
    # The students those results belong to: timed again, a close choice could differ.
    shutil.copy2(source / "students.json", run_dir / "students.json")
    (run_dir / "blocks").mkdir()
    for result in (source / "blocks").glob("[!.]*.npz"):
        if result.name.split("-")[0] in blocks and ".progress" not in result.name:
            shutil.copy2(result, run_dir / "blocks" / result.name)
    return run_dir


def test_tiny_job_end_to_end_with_two_ranks(tiny_run, tmp_path):
    # From the 3-rank run's teacher and cache: teacher training is rank 0's alone, and a
    # 2-rank cache build has its own test (test_cache_resume.py).
    report = _run_tiny(2, _warm_run_dir(tiny_run, tmp_path), teacher_trained_here=False)
    assert report["cache"]["reused"] is True


def test_tiny_job_end_to_end_with_three_ranks_then_again(tiny_run):
    run_dir, first = tiny_run
    # A second run in the same directory reuses the teacher, the cache and the blocks.
    again = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir], timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    second = _check_report(run_dir, 3, all_workers_busy=False)
    assert second["teacher"]["trained_here"] is False
    assert second["cache"]["reused"] is True
    assert second["distill"]["reused_blocks"] == 4 and "done on rank" not in again.stdout
    # The students chosen by their timings the first time, not timed again.
    assert "students: the choice of an earlier run" in again.stdout
    assert second["students"] == first["students"]
    assert second["teacher"]["accuracy"] == first["teacher"]["accuracy"]
    # The same assembled student, settings and ranks: the fine-tuned student is reused too.
    assert first["finetune"]["reused"] is False and second["finetune"]["reused"] is True
    assert "fine-tuning: reusing the fine-tuned student of an earlier run" in again.stdout
    assert second["student"]["accuracy_finetuned"] == first["student"]["accuracy_finetuned"]


def test_baselines_train_kd_and_scratch_for_the_runs_time_and_extend_its_report(tiny_run,
                                                                                 tmp_path):
    # A copy: the run directory may move, and the other tests keep the original.
    run_dir = tmp_path / "moved"
    shutil.copytree(tiny_run[0], run_dir)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pbkd_mpi", "baselines", run_dir, "--budget-s", "3",
         "--budget-factor", "1,2"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert figures["budget_s"] == 3.0 and set(figures["by_factor"]) == {"1", "2"}
    assert figures["pbkd_test"] == report["student"]["accuracy_finetuned"]
    for entry in figures["by_factor"].values():
        # A baseline at chance (3 s of training may leave one there) is no margin's base.
        learned = [entry[f"{m}_test"] for m in ("kd", "scratch") if m not in entry["at_chance"]]
        if learned:
            assert entry["margin"] == pytest.approx(entry["pbkd_test"] - max(learned))
        else:
            assert entry["margin"] is None
    saved = json.loads((run_dir / "baselines.json").read_text())
    assert [(r["factor"], r["method"]) for r in saved["results"]] == [
        (1.0, "kd"), (1.0, "scratch"), (2.0, "kd"), (2.0, "scratch")]
    assert saved["run_wall_s"] == report["wall_s"] and saved["peak_rss_mb"] > 0
    markdown = (run_dir / "report.md").read_text()
    assert "## What it buys" in markdown and "| whole-model KD, x2" in markdown
    assert "time_to_accuracy.png" in markdown and (run_dir / "time_to_accuracy.png").is_file()
    # Redrawn from report.json and baselines.json alike.
    redrawn = subprocess.run([sys.executable, "-m", "pbkd_mpi", "report", run_dir],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert redrawn.returncode == 0 and "## What it buys" in (run_dir / "report.md").read_text()


def _assert_clean_failure(result, elapsed, message):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert elapsed < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0]
    assert "Traceback" not in result.stderr


def test_missing_teacher_file_ends_every_rank_with_one_message(tmp_path):
    started = time.monotonic()
    result = run_mpi(3, ["run", TINY_JOB, "--run-dir", tmp_path / "run",
                         "--set", f"teacher.source={tmp_path / 'nope.keras'}"], timeout=90)
    _assert_clean_failure(result, time.monotonic() - started, "does not exist")


def test_data_that_does_not_fit_the_teacher_ends_every_rank(tmp_path, tiny_teacher):
    teacher_path = tmp_path / "teacher.keras"
    tiny_teacher.save(teacher_path)  # expects 16x16x3 images
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(60, 20, 20, 3), dtype=np.uint8)
    y = np.arange(60) % 10
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    started = time.monotonic()
    result = run_mpi(2, ["run", TINY_JOB, "--run-dir", tmp_path / "run",
                         "--set", f"teacher.source={teacher_path}",
                         "--set", f"data.source={tmp_path / 'data.npz'}",
                         "--set", "data.image_size=[20, 20]"], timeout=90)
    _assert_clean_failure(result, time.monotonic() - started,
                          "The teacher expects inputs of shape (16, 16, 3)")


def test_a_job_over_its_memory_budget_is_refused_before_the_teacher_trains(tmp_path):
    started = time.monotonic()
    result = run_mpi(2, ["run", TINY_JOB, "--run-dir", tmp_path / "run",
                         "--set", "run.memory_budget_mb=200"], timeout=90)
    _assert_clean_failure(result, time.monotonic() - started,
                          "but its memory budget is 200 MB (run.memory_budget_mb)")
    assert "run fewer ranks on each node (now 2)" in result.stderr
    assert not list((tmp_path / "run").glob("teacher*.keras"))


def test_one_rank_is_refused_with_the_launch_explained(tmp_path):
    result = run_mpi(1, ["run", TINY_JOB, "--run-dir", tmp_path / "run"], timeout=60)
    assert result.returncode == 2
    assert "mpirun -np 3" in result.stderr and "Traceback" not in result.stderr


def test_bad_job_key_is_refused_once(tmp_path):
    result = run_mpi(3, ["run", TINY_JOB, "--set", "distill.epoch=2"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "Did you mean 'epochs'?" in result.stderr


def test_blocks_whose_teacher_is_as_fast_keep_its_layers_and_all_kept_is_refused(
        tiny_run, tmp_path):
    """`student.keep_teacher`: a block whose students are not min_speedup times faster than
    its teacher block is not a task. Made certain here with a min_speedup no student
    reaches and conv3 and conv4 pinned to their family (a pinned block is not timed)."""
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv3", "conv4"))
    keep = ["--set", "student.keep_teacher=true", "--set", "student.min_speedup=1000"]
    result = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir, *keep, *QUICK,
                         "--set", 'student.family_overrides=["conv3=separable", '
                                  '"conv4=separable"]'], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert [b["name"] for b in report["blocks"]] == ["conv3", "conv4"]
    rows = {row["name"]: row["candidates"] for row in report["students"]["blocks"]}
    assert [rows[name][0]["family"] for name in ("conv1", "conv2")] == ["teacher"] * 2
    assert [len(rows[name]) for name in ("conv3", "conv4")] == [1, 1]
    assert "conv1 teacher's block, conv2 teacher's block, conv3 separable" in result.stdout
    names = {layer.name for layer in keras.saving.load_model(run_dir / "student.keras").layers}
    assert {"conv1", "conv2"} <= names and not {"conv3", "conv4"} & names
    assert "teacher's block" in (run_dir / "report.md").read_text()
    assert report["student"]["accuracy_finetuned"] > 2 / report["data"]["num_classes"]

    (tmp_path / "all-kept").mkdir()
    started = time.monotonic()
    result = run_mpi(3, ["run", TINY_JOB, "--run-dir",
                         _warm_run_dir(tiny_run, tmp_path / "all-kept"), *keep], timeout=120)
    _assert_clean_failure(result, time.monotonic() - started,
                          "No block has a student faster than its teacher block")


def test_a_failing_block_is_retried_elsewhere_then_kept_as_the_teachers(tiny_run, tmp_path):
    # The other blocks are the tiny run's, so conv3 is the only task. Unsplit: a lone block
    # would otherwise train on both workers at once, and a failing split task ends the run.
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv1", "conv2", "conv4"))
    # No fine-tuning in the failing run (the second run does it): not what is tested here.
    result = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir, "--set", "finetune.epochs=0",
                         "--set", "schedule.split=false", *QUICK], timeout=180,
                     env={"PBKD_FAULT": "raise:conv3"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: block conv3 stays the teacher's after 2 failed attempt(s)" in result.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "degraded" and report["distill"]["reused_blocks"] == 3
    (failure,) = report["failed_blocks"]
    assert failure["name"] == "conv3" and failure["attempts"] == 2
    # Tried on both workers, and the worker's own traceback reached the report.
    assert {e["rank"] for e in failure["errors"]} == {1, 2}
    assert all("InjectedFault" in e["traceback"] for e in failure["errors"])
    assert [b["name"] for b in report["blocks"]] == ["conv1", "conv2", "conv4"]
    student = keras.saving.load_model(run_dir / "student.keras")
    names = {layer.name for layer in student.layers}
    assert "conv3" in names and "conv1" not in names  # conv3 stayed the teacher's
    assert "degraded" in (run_dir / "report.md").read_text()

    # The next run in the same directory trains only the missing block.
    again = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir, *QUICK], timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.findall(r"block (conv\d) done on rank", again.stdout) == ["conv3"]
    report = _check_report(run_dir, 3, all_workers_busy=False)
    assert report["distill"]["reused_blocks"] == 3


def test_a_student_that_misses_the_gate_exits_3_with_its_report(tiny_run, tmp_path):
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv1", "conv2", "conv3", "conv4"))
    result = run_mpi(2, ["run", TINY_JOB, "--run-dir", run_dir, "--set", "finetune.epochs=0",
                         "--set", "gate.min_param_reduction=0.99",
                         "--set", "gate.max_accuracy_drop=0.5", *QUICK], timeout=180)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # The last line names the bar missed; the report and the student are written.
    assert re.search(r"quality gate failed: min_param_reduction 0\.\d+ < 0\.99 ",
                     result.stdout.strip().splitlines()[-1]), result.stdout[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok" and not report["gate"]["passed"]
    bars = {bar["name"]: bar for bar in report["gate"]["bars"]}
    assert not bars["min_param_reduction"]["passed"] and bars["max_accuracy_drop"]["passed"]
    assert "**failed** (the job exited 3)" in (run_dir / "report.md").read_text()
    assert (run_dir / "student.keras").exists()
    # The same run against a bar it meets, without training: exit 0.
    checked = subprocess.run(
        [sys.executable, "-m", "pbkd_mpi", "check", str(run_dir), "--json",
         "--set", "gate.min_param_reduction=0.1"], capture_output=True, text=True,
        timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert checked.returncode == 0, checked.stderr[-2000:]
    verdict = json.loads(checked.stdout)
    assert verdict["passed"] and {b["name"] for b in verdict["bars"]} == {
        "min_param_reduction", "max_accuracy_drop"}  # the run's own bar, and the new one


def test_a_failing_export_is_reported_and_the_run_ends_with_exit_4(tiny_run, tmp_path):
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv1", "conv2", "conv3", "conv4"))
    result = run_mpi(2, ["run", TINY_JOB, "--run-dir", run_dir, "--set", "finetune.epochs=0",
                         "--set", "schedule.profile=false", "--set", "accept.max_drop=1.0",
                         "--set", "export.tflite=both"], timeout=180,
                     env={"PBKD_FAULT": "fail:tflite_int8"})
    assert result.returncode == 4, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stdout + result.stderr
    # No converter or interpreter chatter on the console: it is in the rank's log.
    assert "Created TensorFlow Lite XNNPACK delegate" not in result.stdout + result.stderr
    assert "tf_tfl_flatbuffer_helpers" not in result.stdout + result.stderr
    problem_lines = [line for line in result.stdout.splitlines() if "problem:" in line]
    assert len(problem_lines) == 1 and "export tflite_int8" in problem_lines[0]
    assert "finished with 1 problem(s)" in result.stdout.strip().splitlines()[-1]
    report = json.loads((run_dir / "report.json").read_text())
    assert [p["step"] for p in report["problems"]] == ["export tflite_int8"]
    assert "fault injected" in report["problems"][0]["reason"]
    # Everything else was made: the float32 file checked and timed, not the int8 one.
    exports = report["deployment"]["exports"]
    assert set(exports) == {"keras", "saved_model", "tflite_float32"}
    assert exports["tflite_float32"]["ops"] == "builtins"
    assert not (run_dir / "student_int8.tflite").exists()
    assert {row["runtime"] for row in report["deployment"]["latency"]} == {
        "keras", "tflite-float32"}
    assert "## Problems" in (run_dir / "report.md").read_text()
    assert "fault injected into 'export tflite_int8'" in (run_dir / "logs" / "rank-0.log"
                                                           ).read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra, code in (([], 4), (["--set", "gate.allow_problems=true"], 0)):
        checked = subprocess.run([sys.executable, "-m", "pbkd_mpi", "check", str(run_dir),
                                  *extra], capture_output=True, text=True, timeout=120,
                                 env=env)
        assert checked.returncode == code, checked.stdout + checked.stderr[-2000:]
    # The later commands take the directory: redrawn, and the baselines measured.
    redrawn = subprocess.run([sys.executable, "-m", "pbkd_mpi", "report", str(run_dir)],
                             capture_output=True, text=True, timeout=60, env=env)
    assert redrawn.returncode == 0, redrawn.stderr[-2000:]
    baselines = subprocess.run([sys.executable, "-m", "pbkd_mpi", "baselines", str(run_dir),
                                "--budget-s", "2", "--budget-factor", "1"],
                               capture_output=True, text=True, timeout=120, env=env)
    assert baselines.returncode == 0, baselines.stderr[-2000:]
    assert (run_dir / "baselines.json").is_file()


def test_a_block_with_nan_loss_fails_every_attempt_and_the_run_completes(tiny_run, tmp_path):
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv1", "conv3", "conv4"))
    # A budget the estimate (about 660 MB) fits and the ranks' real RSS passes: the
    # memory watch warns, naming rank and phase, and the run goes on.
    result = run_mpi(2, ["run", TINY_JOB, "--run-dir", run_dir,
                         "--set", "tasks.max_attempts=1", "--set", "finetune.epochs=0",
                         "--set", "run.memory_budget_mb=750", *QUICK],
                     timeout=180,
                     env={"PBKD_FAULT": "nan:conv2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"warning: rank 1: resident memory [\d,]+ MB in the \w+ phase is \d+% "
                     r"of this rank's budget \(750 MB\)", result.stderr), result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["memory_budget"]["budget_mb"] == 750
    assert report["memory_budget"]["estimate_mb"] <= 750
    assert "budget 750 MB per rank (run.memory_budget_mb)" in (run_dir / "report.md").read_text()
    assert report["status"] == "degraded" and report["distill"]["reused_blocks"] == 3
    (failure,) = report["failed_blocks"]
    assert failure["name"] == "conv2" and failure["attempts"] == 1
    assert "non-finite" in failure["errors"][0]["error"]


def test_sigusr1_stops_the_job_with_exit_75_and_the_next_run_resumes(tiny_run, tmp_path):
    run_dir = _warm_run_dir(tiny_run, tmp_path)
    command = ["mpiexec", "-n", "3", sys.executable, "-m", "pbkd_mpi", "run", str(TINY_JOB),
               "--run-dir", str(run_dir), "--set", "distill.epochs=8",
               "--set", "finetune.epochs=0", *QUICK]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=REPO) as job:
        lines = []
        for line in job.stdout:  # signal once the first block is finished
            lines.append(line)
            if " done on rank " in line:
                job.send_signal(signal.SIGUSR1)  # mpiexec forwards it to every rank
                signalled = time.monotonic()
                break
        else:
            pytest.fail("no block finished: " + "".join(lines) + job.stderr.read())
        try:
            out, err = job.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # the ranks' own watchdog should end them first
            job.kill()
            out, err = job.communicate()
            pytest.fail("the job did not stop within 60 s of SIGUSR1:\n" + err[-6000:])
        lines.append(out)
    # An orderly stop: not the watchdog's (which would print the stuck ranks' stacks).
    assert job.returncode == 75 and "did not stop" not in err, err[-6000:]
    assert time.monotonic() - signalled < 30
    assert "stopped: " in err and "SIGUSR1" in err and "Traceback" not in err
    done = set(re.findall(r"block (conv\d) done on rank", "".join(lines)))
    blocks = run_dir / "blocks"
    saved = {p.name.split("-")[0] for p in blocks.glob("*.npz") if ".progress" not in p.name}
    assert done and saved == done
    in_progress = {p.name.split("-")[0]: load_state(p).epoch + 1
                   for p in blocks.glob("*.progress.npz")}
    assert not set(in_progress) & done
    assert not (run_dir / "report.json").exists()
    assert time.monotonic() - started < 150

    again = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir, "--set", "distill.epochs=8",
                        "--set", "finetune.epochs=0", *QUICK], timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok"
    # Distillation reused what the stopped run finished (acceptance may then retrain one of
    # them wider: the report's row describes the block the student got).
    assert report["distill"]["reused_blocks"] == len(done)
    assert f"reusing {len(done)} finished block(s) of an earlier run: " \
        f"{', '.join(sorted(done))}" in again.stdout
    for block in report["blocks"]:  # blocks stopped mid-training carried on from there
        assert block["resumed_from_epoch"] == in_progress.get(block["name"], 0)
    assert not list(blocks.glob("*.progress.npz"))


def test_block_weights_do_not_depend_on_the_number_of_workers(tiny_run, tmp_path):
    """Tasks are independent and seeded by block: 2 workers, 1 worker, and 1 worker with
    rank 0 training in a thread beside it (one thread each, so reductions run in the same
    order) must train identical weights. Two epochs each: enough for any difference in
    order or data to show."""
    run_dir = _warm_run_dir(tiny_run, tmp_path)
    from pbkd_mpi.distill.results import load_result

    weights = {}
    for ranks, rank0_trains, expected_ranks in ((3, "no", {1, 2}), (2, "no", {1}),
                                                (2, "yes", {0, 1})):
        result = run_mpi(ranks, ["run", TINY_JOB, "--run-dir", run_dir, "--set", "run.threads=1",
                                 "--set", "distill.epochs=2", "--set", "finetune.epochs=0",
                                 "--set",
                                 f"tasks.coordinator_trains={rank0_trains}", "--quiet", *QUICK],
                         timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(result.stdout.splitlines()) == 1 and "report:" in result.stdout  # --quiet
        blocks = run_dir / "blocks"
        weights[ranks, rank0_trains] = {path.name: load_result(path)[0]["weights"]
                                        for path in blocks.glob("*.npz")}
        report = json.loads((run_dir / "report.json").read_text())
        assert {b["rank"] for b in report["blocks"]} == expected_ranks
        assert report["distill"]["coordinator_trains"] is (rank0_trains == "yes")
        # Rank 0 fine-tunes (here: scores the merged student) exactly when it trains tasks.
        assert report["finetune"]["ranks"] == (ranks if rank0_trains == "yes" else ranks - 1)
        # Rank 0 kept coordinating while it trained: it never went a second without looking.
        assert report["distill"]["max_poll_gap_s"] < 1.0
        for path in blocks.glob("*.npz"):
            path.unlink()  # the next run must train every block again
    reference = weights[3, "no"]
    assert len(reference) == 4
    for other in (weights[2, "no"], weights[2, "yes"]):
        assert sorted(other) == sorted(reference)
        for name, per_layer in reference.items():
            for layer, arrays in per_layer.items():
                for a, b in zip(arrays, other[name][layer]):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name} {layer}")


def test_a_silent_worker_ends_the_job_naming_its_rank_and_block(tiny_run, tmp_path):
    run_dir = _warm_run_dir(tiny_run, tmp_path)
    started = time.monotonic()
    result = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir,
                         "--set", "tasks.silence_limit_s=6", "--set", "distill.epochs=8",
                         *QUICK],
                     timeout=120, env={"PBKD_FAULT": "hang:2:3"})  # SIGSTOP: alive, silent
    assert result.returncode == 1, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"rank 2 stopped answering while (training block "
                                          r"conv\d|waiting for a task)", errors[0])
    assert "Traceback" not in result.stderr


def test_a_killed_worker_ends_the_job_and_finished_blocks_are_kept(tiny_run, tmp_path):
    run_dir = _warm_run_dir(tiny_run, tmp_path)
    args = ["run", TINY_JOB, "--run-dir", run_dir, "--set", "distill.epochs=8", *QUICK]
    blocks = run_dir / "blocks"
    # The timer starts with rank 1's first block task: the kill lands in the middle of them.
    started = time.monotonic()
    result = run_mpi(3, args, timeout=180, env={"PBKD_FAULT": "kill:1:3"})
    assert result.returncode != 0
    assert time.monotonic() - started < 60  # start-up, 3 s of training, then the end
    # Rank 1's supervisor (pbkd_mpi.supervisor) names it, its signal and its block.
    assert re.search(r"error: rank 1 was killed by SIGKILL while training block conv\d\. .*"
                     r"run the same command again to resume", result.stderr), result.stderr
    done = set(re.findall(r"block (conv\d) done on rank", result.stdout))
    saved = {p.name.split("-")[0] for p in blocks.glob("*.npz") if ".progress" not in p.name}
    # Rank 0 saves a block before it says so: all said are saved, and at most the one being
    # reported when the launcher ended the job is saved unsaid.
    assert done <= saved and len(saved - done) <= 1
    # Rank 0's log says which block each rank was given, for the post-mortem.
    assert re.search(r"block conv\d -> rank 1", (run_dir / "logs" / "rank-0.log")
                     .read_text())


def test_the_chained_pass_trains_each_block_on_the_workers_then_is_reused(tiny_run, tmp_path):
    # From the tiny run's teacher, cache and blocks: the chained pass (each block a task on
    # a worker, one after another), then a resumed run that reuses them all.
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv1", "conv2", "conv3", "conv4"))
    args = ["run", TINY_JOB, "--run-dir", run_dir, "--set", "finetune.epochs=0",
            "--set", "distill.chained_epochs=1", *QUICK]
    result = run_mpi(3, args, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    _check_keys_documented(report)
    assert report["distill"]["reused_blocks"] == 4
    assert report["phases"]["chain"] > 0 and report["chained"]["epochs"] == 1
    rows = report["chained"]["blocks"]
    assert [row["name"] for row in rows] == ["conv1", "conv2", "conv3", "conv4"]
    assert rows[0]["skipped"] and not any(row.get("failed") for row in rows)
    assert all(row["epochs"] == 1 and row["input_bytes"] > 0 and not row["reused"]
               for row in rows[1:])
    # The last block learned through the teacher's head too (sent to the worker with it).
    assert [row["head_weight"] for row in rows[1:]] == [0.0, 0.0, 1.0]
    assert rows[-1]["val_loss"] > rows[-1]["val_mse"]
    assert re.findall(r"chained (conv\d)", result.stdout) == ["conv2", "conv3", "conv4"]
    assert not list((run_dir / "chain").glob("*.h5"))  # the student inputs are deleted
    again = run_mpi(3, args, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((run_dir / "report.json").read_text())
    assert all(row["reused"] for row in second["chained"]["blocks"][1:])
    assert second["student"]["accuracy_merged"] == report["student"]["accuracy_merged"]


def test_a_block_split_over_two_workers_learns_what_it_learns_alone(tiny_run, tmp_path):
    # conv2 is the only task (the other blocks are the tiny run's): first split over both
    # workers, then trained again on one.
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv1", "conv3", "conv4"))
    reports = {}
    # Splitting needs a measured profile (QUICK turns profiling off).
    for label, schedule in (("split", ["schedule.profile=true",
                                       'schedule.split_blocks=["conv2=2"]']),
                            ("alone", ["schedule.split=false"])):
        for result in (run_dir / "blocks").glob("conv2-*.npz"):
            result.unlink()
        run = run_mpi(3, ["run", TINY_JOB, "--run-dir", run_dir, "--set", "finetune.epochs=0",
                          *QUICK, *(f"--set={item}" for item in schedule)], timeout=180)
        assert run.returncode == 0, run.stderr[-3000:]
        reports[label] = json.loads((run_dir / "report.json").read_text())
        assert reports[label]["distill"]["reused_blocks"] == 3

    assert reports["split"]["schedule"]["split"] == {"conv2": 2}
    (task,) = reports["split"]["schedule"]["tasks"]
    assert task["name"] == "conv2"
    assert sorted(task["ranks"]) == [1, 2] and task["replicas_identical"] is True
    assert reports["alone"]["schedule"]["split"] == {}
    (task,) = reports["alone"]["schedule"]["tasks"]
    assert len(task["ranks"]) == 1
    a, b = ({r["name"]: r for r in reports[label]["blocks"]}["conv2"]
            for label in ("alone", "split"))
    relative = {name: row["val_mse"] / row["target_variance"]
                for name, row in (("alone", a), ("split", b))}
    # Same global batch, start, data and epochs; what differs is BN's statistics over half
    # batches and the order of samples. Both must improve on the start, and end close.
    for row in (a, b):
        assert row["val_mse"] < row["initial_val_mse"]
    assert abs(relative["split"] - relative["alone"]) <= 0.25 * relative["alone"], relative


def test_acceptance_scores_on_the_workers_and_retrains_wider_during_the_run(tiny_run,
                                                                            tmp_path):
    # Every first student is the tiny run's, so the hand-out starts with nothing but
    # acceptance's work: the teacher's and 4 solo scores, as tasks on the workers, then a
    # wider retrain for each block that costs any validation accuracy (max_drop 0).
    run_dir = _warm_run_dir(tiny_run, tmp_path, blocks=("conv1", "conv2", "conv3", "conv4"))
    args = ["run", TINY_JOB, "--run-dir", run_dir, "--set", "finetune.epochs=0",
            "--set", "distill.chained_epochs=0", "--set", "accept.max_drop=0.0",
            "--set", "schedule.profile=false", "--set", "export.saved_model=false",
            "--set", "export.tflite=none"]
    result = run_mpi(3, args, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    workers_logs = "".join((run_dir / "logs" / f"rank-{r}.log").read_text() for r in (1, 2))
    for name in ("teacher", "conv1", "conv2", "conv3", "conv4"):
        assert f"score {name}: val accuracy" in workers_logs
    assert not re.search(r"score \w+: val accuracy",  # rank 0 only decides
                         (run_dir / "logs" / "rank-0.log").read_text())
    assert report["accept"]["score_seconds"] > 0
    widened = []
    for block in report["blocks"]:
        verdict = block["accept"]
        assert (verdict["decision"] == "accepted") == (verdict["drop"] <= 0.0)
        if verdict["decision"] != "accepted":  # retrained wider, and that one scored too
            widened.append(block["name"])
            assert verdict["wider_solo_val_accuracy"] is not None
            assert verdict["decision"] == ("accepted_wider" if verdict["wider_drop"] <= 0.0
                                           else "kept_teacher")
            assert f"score {block['name']} (wider)" in workers_logs
    # (a wider student the tiny run trained is reused, like any result)
    trained_now = re.findall(r"block (conv\d)\+wider done on rank", result.stdout)
    assert set(trained_now) <= set(widened)
    # Run again: the wider students are reused, the verdicts are the same.
    again = run_mpi(3, args, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "+wider done" not in again.stdout
    second = json.loads((run_dir / "report.json").read_text())
    assert [b["accept"] for b in second["blocks"]] == [b["accept"] for b in report["blocks"]]
