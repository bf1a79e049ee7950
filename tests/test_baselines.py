"""The baselines: whole-model KD that really distils, the budget, the recipe, the graph
they train (the assembled student, BNs and all) and the flag of a baseline at chance."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from pbkd_mpi.errors import UserError
from pbkd_mpi.finetune.baselines import (METHOD_PHASES, at_chance, chance_bound, fresh_copy,
                                         kd_model, method_seconds, run_baseline,
                                         train_within_budget)
from pbkd_mpi.model.evaluate import accuracy
from pbkd_mpi.model.logits import logits_model


def _classifier(seed: int, softmax: bool):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax" if softmax else None)(hidden)
    return keras.Model(inputs, outputs)


def test_whole_model_kd_makes_the_student_agree_with_the_teacher():
    # The Keras pitfall: LogitsDistillation's default loss compares raw logits / T and the
    # student stays at chance (1 in 10 here). The soft targets alone (alpha 1, the labels
    # are noise) must carry the teacher's decisions over.
    teacher = _classifier(0, softmax=True)
    student = _classifier(1, softmax=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 8)).astype("float32") * 3
    noise_labels = rng.integers(0, 10, len(x))
    distiller = kd_model(teacher, student, temperature=4.0, alpha=1.0, rate=3e-3)
    distiller.fit(x, noise_labels, batch_size=64, epochs=15, verbose=0)
    x_new = rng.normal(size=(1000, 8)).astype("float32") * 3
    agreement = np.mean(np.argmax(student.predict(x_new, verbose=0), -1)
                        == np.argmax(teacher.predict(x_new, verbose=0), -1))
    assert agreement > 0.6, agreement


def _report(**phases):
    return {"phases": phases, "cache": {"reused": False},
            "distill": {"reused_blocks": 0}, "finetune": {"reused": False}}


def test_the_budget_is_the_run_after_its_teacher():
    seconds = {name: 10.0 for name in METHOD_PHASES}
    assert method_seconds(_report(load=3.0, teacher=100.0, evaluate=5.0, deploy=7.0,
                                  **seconds)) == 10.0 * len(METHOD_PHASES)
    # A run without a chained pass has no "chain" phase.
    del seconds["chain"]
    assert method_seconds(_report(**seconds)) == 10.0 * (len(METHOD_PHASES) - 1)


def test_a_run_that_reused_earlier_work_is_refused_without_a_budget():
    report = _report(distill=1.0)
    report["cache"]["reused"] = True
    report["distill"]["reused_blocks"] = 3
    with pytest.raises(UserError, match=r"reused the activation cache, 3 block\(s\).*"
                                        r"--budget-s"):
        method_seconds(report)


def test_a_baseline_keeps_its_best_epoch_within_its_budget(tiny_dataset, tiny_teacher):
    import keras

    reads = tiny_dataset.test_reads
    lines = []
    result = run_baseline("scratch", tiny_teacher, tiny_teacher, tiny_dataset, 3.0,
                          batch_size=32, rate=1e-3, temperature=4.0, alpha=0.7, seed=0,
                          log=lines.append)
    assert result["method"] == "scratch" and result["epochs"] == len(result["curve"]) >= 1
    assert len(lines) == result["epochs"]
    values = [val for _, val in result["curve"]]
    assert result["val_accuracy"] == max(values)
    assert result["best_epoch"] == values.index(max(values)) + 1
    rates = result["learning_rates"]
    assert rates[0] == 1e-3 and all(a >= b for a, b in zip(rates, rates[1:]))
    # A second epoch starts only when the epochs so far say it fits.
    if result["epochs"] > 1:
        assert result["curve"][-2][0] < 3.0
    assert tiny_dataset.test_reads == reads + 1  # the test split, once, at the end
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["chance"] == 1 / tiny_dataset.num_classes
    assert result["at_chance"] == (min(result["val_accuracy"], result["test_accuracy"])
                                   <= result["chance_bound"])

    # The best epoch's weights are the ones kept: scoring again gives its accuracy.
    student = keras.models.clone_model(tiny_teacher)
    model = logits_model(student)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kept = train_within_budget(model, model, tiny_dataset, 2.0, 32, 1e-3, 0,
                               log=lambda _: None)
    assert accuracy(model, tiny_dataset.x_val, tiny_dataset.y_val) == kept["val_accuracy"]


def test_the_learning_rate_never_rises_when_more_epochs_fit(tiny_dataset, tiny_teacher):
    """The first epoch traces the graph (10 s on this clock), the next takes 1 s: the
    estimate grows from 10 to 91 epochs, and a cosine over 91 would start high again."""
    import keras

    ticks = iter([0, 0, 10, 10, 10, 11, 11, 11, 12, 100, 100])
    model = logits_model(keras.models.clone_model(tiny_teacher))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    result = train_within_budget(model, model, tiny_dataset, 100.0, 32, 1e-3, 0,
                                 log=lambda _: None, clock=lambda: next(ticks))
    second = 1e-3 * 0.5 * (1 + math.cos(math.pi / 10))  # epoch 2 of the 10 planned then
    assert result["epochs"] == 3
    assert result["learning_rates"] == pytest.approx([1e-3, second, second])


def _layer_classes(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def _run_dir(tmp_path, dataset, teacher, moved: bool = True):
    """A finished run's directory as `baselines` reads it: job.toml, report.json, the
    teacher, `student.keras` deployed (BNs folded) and `student-assembled.keras` (the
    tiny teacher's graph stands in for the assembled student: convs, BNs, ReLUs)."""
    from pbkd_mpi.keys import model_fingerprint
    from pbkd_mpi.model.fold import fold_batchnorm
    from pbkd_mpi.model.graph import flatten_model

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    teacher.save(run_dir / "teacher.keras")
    teacher.save(run_dir / "student-assembled.keras")
    folded, _ = fold_batchnorm(teacher, dataset.x_train[:8])
    folded.save(run_dir / "student.keras")
    (run_dir / "job.toml").write_text(
        f'[teacher]\nsource = "{run_dir / "teacher.keras"}"\n'
        f'[data]\nsource = "demo"\nimage_size = [16, 16]\ndemo_train = 300\n'
        f'demo_test = 100\n[run]\ndir = "{run_dir}"\n')
    # The run was made elsewhere and moved here: report.json names the old place.
    origin = tmp_path / "elsewhere" if moved else run_dir
    summary = dataset.summary()
    report = {"wall_s": 12.0, "phases": {"distill": 5.0},
              "data": {k: summary[k] for k in ("train", "val", "test", "num_classes")},
              "teacher": {"file": str(origin / "teacher.keras"),
                          "fingerprint": model_fingerprint(flatten_model(teacher))},
              "student": {"path": str(origin / "student.keras"),
                          "assembled_path": str(origin / "student-assembled.keras"),
                          "accuracy_finetuned": 0.8, "val_accuracy_finetuned": 0.8},
              "cache": {"reused": False}, "distill": {"reused_blocks": 0},
              "finetune": {"reused": False}}
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir


def test_baselines_train_the_assembled_student_with_its_batch_norms(
        tmp_path, tiny_dataset, tiny_teacher, monkeypatch, capsys):
    """The deployed student.keras has its BNs folded into the convs: from fresh weights
    that graph stayed at chance. The baselines train the assembled student's graph."""
    import keras

    from pbkd_mpi.commands import baselines as command
    from pbkd_mpi.model.teacher import load_model_file

    run_dir = _run_dir(tmp_path, tiny_dataset, tiny_teacher)
    trained = []

    def fake_baseline(method, teacher, student_graph, dataset, budget_s, **_):
        trained.append(fresh_copy(student_graph))  # what run_baseline trains
        val = 0.11 if method == "kd" else 0.6  # 10 classes: KD at chance
        return {"method": method, "budget_s": budget_s, "used_s": budget_s, "epochs": 3,
                "best_epoch": 1, "val_accuracy": val, "test_accuracy": val,
                "learning_rates": [1e-3] * 3, "curve": [[1.0, val]], "chance": 0.1,
                "chance_bound": 0.145, "at_chance": at_chance(val, 10)}

    monkeypatch.setattr(command, "run_baseline", fake_baseline)
    monkeypatch.setattr(command, "render_report", lambda run_dir, report: "report.md")
    args = SimpleNamespace(run=str(run_dir), budget_factor="1", budget_s=1.0,
                           learning_rate=1e-3)
    assert command.baselines_command(args) == 0

    assembled = load_model_file(str(run_dir / "student-assembled.keras"))
    deployed = load_model_file(str(run_dir / "student.keras"))
    assert "BatchNormalization" not in _layer_classes(deployed)  # the folded one
    assert len(trained) == 2
    for graph in trained:
        assert _layer_classes(graph) == _layer_classes(assembled)
        assert "BatchNormalization" in _layer_classes(graph)
        # Fresh weights, not the assembled student's.
        kernel = graph.get_layer("conv1").get_weights()[0]
        assert not np.allclose(kernel, assembled.get_layer("conv1").get_weights()[0])

    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "whole-model KD x1 stayed at chance" in warnings[0]
    assert "accuracy 0.110, test 0.110" in warnings[0] and "chance 0.100" in warnings[0]
    figures = json.loads(out.out.strip().splitlines()[-1])
    # The margin is over the baseline that learned, never over the one at chance.
    assert figures["at_chance"] == ["kd"]
    assert figures["margin"] == pytest.approx(0.8 - 0.6)
    saved = json.loads((run_dir / "baselines.json").read_text())
    assert [r["at_chance"] for r in saved["results"]] == [True, False]


def test_baselines_name_the_assembled_student_they_need(tmp_path, tiny_dataset,
                                                        tiny_teacher):
    from pbkd_mpi.commands import baselines as command

    run_dir = _run_dir(tmp_path, tiny_dataset, tiny_teacher, moved=False)
    (run_dir / "student-assembled.keras").unlink()
    args = SimpleNamespace(run=str(run_dir), budget_factor="1", budget_s=1.0,
                           learning_rate=1e-3)
    with pytest.raises(UserError, match=r"assembled student graph, expected at .*"
                                        r"student-assembled\.keras"):
        command.baselines_command(args)
    # A report without `assembled_path` (an older run): RUN/student-assembled.keras.
    report = json.loads((run_dir / "report.json").read_text())
    del report["student"]["assembled_path"]
    with pytest.raises(UserError, match=str(run_dir / "student-assembled.keras")):
        command.trainable_student_file(run_dir, report)


def test_a_baseline_within_a_few_points_of_chance_is_flagged():
    chance, bound = chance_bound(10)
    assert chance == 0.1 and bound == pytest.approx(0.145)
    assert at_chance(0.100, 10) and at_chance(0.117, 10) and at_chance(0.145, 10)
    assert not at_chance(0.2, 10)
    assert chance_bound(2)[1] == pytest.approx(0.525)
    assert at_chance(0.52, 2) and not at_chance(0.6, 2)
    # Many classes: twice chance already learned something.
    assert chance_bound(100)[1] == pytest.approx(0.02)
    assert at_chance(0.015, 100) and not at_chance(0.03, 100)


def test_the_report_warns_of_a_baseline_at_chance_and_takes_no_margin_over_it():
    from pbkd_mpi.commands.baselines import summary
    from pbkd_mpi.output.report import _baseline_lines

    def row(method, val, stuck):
        return {"factor": 1.0, "method": method, "budget_s": 10.0, "used_s": 10.0,
                "epochs": 5, "val_accuracy": val, "test_accuracy": val, "chance": 0.1,
                "chance_bound": 0.145, "at_chance": stuck}

    report = {"student": {"accuracy_finetuned": 0.8, "val_accuracy_finetuned": 0.8}}
    baselines = {"method_s": 10.0, "budget_given": False, "learning_rate": 1e-3,
                 "peak_rss_mb": 100,
                 "results": [row("kd", 0.117, True), row("scratch", 0.1, True)]}
    markdown = "\n".join(_baseline_lines({**report, "baselines": baselines}))
    assert "| whole-model KD, x1 (at chance) |" in markdown
    assert ("**Warning:** whole-model KD x1 stayed at chance: best validation accuracy "
            "11.7%, test 11.7% after 5 epoch(s), chance 10.0%") in markdown
    assert "from scratch on labels x1 stayed at chance" in markdown
    figures = summary(report, baselines)
    assert figures["margin"] is None and figures["at_chance"] == ["kd", "scratch"]
