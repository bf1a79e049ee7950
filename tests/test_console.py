"""Rank 0's terminal output: plain lines off a terminal, a live status line on one."""

import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pbkd_mpi.output.console import (Console, DistillProgress, live_terminal, progress_bar,
                                     progress_callbacks, relay_callback, replay)


from .conftest import REPO

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def test_plain_output_has_one_timestamped_line_per_event_and_no_control_characters():
    out = io.StringIO()
    console = Console(verbosity=1, live=False, stream=out)
    console("teacher loaded")
    console.status("distill [###---] 1/2")  # ignored off a terminal
    console.detail("block conv1 -> rank 1")  # --verbose only
    console.result("report: runs/x/report.md")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in lines)
    assert not CONTROL.search(out.getvalue())


def test_quiet_prints_only_results_and_verbose_prints_details():
    quiet, verbose = io.StringIO(), io.StringIO()
    for console in (Console(0, live=False, stream=quiet), Console(2, live=False, stream=verbose)):
        console("event")
        console.detail("detail")
        console.result("result")
    assert [line[11:] for line in quiet.getvalue().splitlines()] == ["result"]
    assert [line[11:] for line in verbose.getvalue().splitlines()] == [
        "event", "detail", "result"]


def test_live_output_keeps_the_status_line_under_the_events():
    out = io.StringIO()
    console = Console(verbosity=1, live=True, stream=out)
    progress = DistillProgress(console, {"a": 3.0, "b": 1.0})
    progress.dispatched("a", 1)
    progress.dispatched("b", 2)
    console("block b done")
    progress.ended("b")
    text = out.getvalue()
    assert "\r\x1b[K" in text
    screen = text.split("\r\x1b[K")[-1]  # what the terminal shows last on the status line
    assert screen.startswith("distill [#####---------------] 1/2 blocks | r1:a |")
    assert "s left" in screen
    assert "block b done\n" in text
    console.clear_status()
    assert out.getvalue().endswith("\r\x1b[K")


def test_progress_bar():
    assert progress_bar(0, 4, width=4) == "[----]"
    assert progress_bar(2, 4, width=4) == "[##--]"
    assert progress_bar(9, 4, width=4) == "[####]"


def test_forced_modes(monkeypatch):
    monkeypatch.setenv("PBKD_PROGRESS", "live")
    assert live_terminal()
    monkeypatch.setenv("PBKD_PROGRESS", "plain")
    assert not live_terminal()


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script")
def test_rank_0_sees_the_launchers_terminal_through_the_mpi_pipe(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from mpi4py import MPI\nfrom pbkd_mpi.output.console import live_terminal\n"
                     "if MPI.COMM_WORLD.rank == 0:\n    print(0, live_terminal())\n")
    command = f"mpiexec -n 2 {sys.executable} {probe}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PBKD_PROGRESS", None)
    piped = subprocess.run(command.split(), capture_output=True, text=True, timeout=60, env=env)
    assert "0 False" in piped.stdout, piped.stdout + piped.stderr
    on_terminal = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                                 text=True, timeout=60, env=env)
    assert "0 True" in on_terminal.stdout, on_terminal.stdout + on_terminal.stderr


def test_a_relayed_training_draws_the_same_lines_and_scalars_as_a_local_one(tmp_path):
    """Fine-tuning on the workers alone: the first worker's relay_callback events, replayed
    on rank 0, give rank 0's callbacks what a training of its own would (epoch lines in
    order, TensorBoard event files)."""
    def train(callbacks):  # the calls finetune.finetune makes, in its order
        for callback in callbacks:
            callback.on_train_begin()
        for epoch in range(2):
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            for callback in callbacks:
                callback.on_epoch_end(epoch, {"loss": np.float32(0.5 - epoch / 10),
                                              "val_accuracy": 0.7 + epoch / 10})
        for callback in callbacks:
            callback.on_train_end()

    outputs = {}
    for mode in ("local", "relayed"):
        out = io.StringIO()
        console = Console(verbosity=2, live=False, stream=out)
        callbacks = progress_callbacks(console, "fine-tuning", 2, tmp_path / mode)
        if mode == "local":
            train(callbacks)
        else:
            events = []
            train([relay_callback(events.append)])
            assert [name for name, _, _ in events] == [
                "on_train_begin", "on_epoch_begin", "on_epoch_end", "on_epoch_begin",
                "on_epoch_end", "on_train_end"]
            for event in events:
                replay(callbacks, event)
        outputs[mode] = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
        assert list((tmp_path / mode).glob("events.out.tfevents.*"))
    assert outputs["relayed"] == outputs["local"]
    assert outputs["local"] == ["fine-tuning: epoch 1: loss 0.5, val_accuracy 0.7",
                                "fine-tuning: epoch 2: loss 0.4, val_accuracy 0.8"]
    with pytest.raises(ValueError, match="on_batch_end"):
        replay([], ("on_batch_end", 0, {}))
