"""`coordinate`'s stages in one process: rank 0 alone in a one-rank MPI world, training the
block tasks in its own thread (tasks.coordinator_trains = "yes"), every collective phase
run by rank 0 alone. Real MPI, TensorFlow and HDF5; mpiexec runs the same stages with
workers in tests/mpi/."""

from __future__ import annotations

import io
import json

import pytest
from mpi4py import MPI

from pbkd_mpi.config import DataConfig, load_job
from pbkd_mpi.data.dataset import load_dataset
from pbkd_mpi.distill.chain import skipped_pass
from pbkd_mpi.model.evaluate import test_accuracies as final_accuracies
from pbkd_mpi.mpi.protocol import Coordinator
from pbkd_mpi.output.console import Console
from pbkd_mpi.pipeline import coordinate

from .conftest import TINY_JOB

STAGES = ["load", "teacher", "blocks", "cache", "profile", "distill", "accept", "chain",
          "assemble", "finetune", "evaluate", "deploy"]


def _run(run_dir):
    job = load_job(TINY_JOB, ["tasks.coordinator_trains=yes", "schedule.profile=false",
                              "distill.chained_epochs=1", "export.tflite=none", "export.saved_model=false"],
                   run_dir=str(run_dir))
    output = io.StringIO()
    report = coordinate(job, Coordinator(MPI.COMM_WORLD), Console(1, live=False, stream=output))
    return report, output.getvalue()


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    first = _run(run_dir)
    return run_dir, first, _run(run_dir)


def test_every_stage_runs_in_one_process(one_process_run):
    run_dir, (report, output), _ = one_process_run
    assert MPI.COMM_WORLD.Get_size() == 1
    assert list(report["phases"]) == STAGES
    assert report["status"] == "ok" and report["workers"] == 0
    assert report["distill"]["coordinator_trains"] is True
    assert report["blocks"] and all(b["rank"] == 0 and not b["reused"] for b in report["blocks"])
    assert report["schedule"]["profile_method"].startswith("FLOP estimate")
    # The chained pass ran each block after the first through rank 0's thread.
    chained = report["chained"]["blocks"]
    assert [row["name"] for row in chained] == [b["name"] for b in report["blocks"]
                                                if b["replaced"]]
    assert any("val_mse" in row for row in chained)
    assert report["finetune"]["reused"] is False and report["finetune"]["ranks"] == 1
    chance = 1 / report["data"]["num_classes"]
    assert report["student"]["accuracy_finetuned"] > 2 * chance
    assert report["data"]["test_split_reads"] == 1
    assert (run_dir / "student.keras").exists() and (run_dir / "report.md").exists()
    assert "blocks: " in output and "fine-tuning on 1 ranks" in output


def test_a_second_run_reuses_every_finished_stage(one_process_run):
    run_dir, (first, _), (second, output) = one_process_run
    assert json.loads((run_dir / "report.json").read_text()) == second
    assert second["teacher"]["trained_here"] is False
    assert second["cache"]["reused"] is True
    assert all(b["reused"] for b in second["blocks"])
    assert all(row["reused"] for row in second["chained"]["blocks"] if "skipped" not in row)
    assert second["finetune"]["reused"] is True
    assert "reusing" in output
    for key in ("accuracy_merged", "accuracy_finetuned", "params"):
        assert second["student"][key] == first["student"][key]


def test_the_final_evaluation_refuses_a_test_split_read_before(tiny_teacher):
    dataset = load_dataset(DataConfig(image_size=(16, 16), demo_train=300, demo_test=100),
                           seed=0)
    dataset.test_split()  # an earlier stage peeking at the test split
    with pytest.raises(RuntimeError, match="test split was read 1 time"):
        final_accuracies(tiny_teacher, "unused.keras", tiny_teacher, dataset)


def test_a_chained_pass_without_a_cache_is_skipped_and_says_why():
    job = load_job(TINY_JOB, ["distill.chained_epochs=2"])
    said = []

    class Source:
        mode = "recompute"

    entry = skipped_pass(job, Source(), said.append)
    assert entry == {"epochs": 2, "blocks": [], "input_bytes_max": 0,
                     "skipped": "cache.mode resolved to recompute: no cache to read targets "
                                "from"}
    assert said == [f"chained pass skipped: {entry['skipped']}"]
    Source.mode = "cache"
    assert skipped_pass(job, Source(), said.append) is None
    assert skipped_pass(load_job(TINY_JOB, []), Source(), said.append) is None

