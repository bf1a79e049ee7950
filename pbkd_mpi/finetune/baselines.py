"""What the method buys: the usual alternatives trained for the same wall time.

Two baselines, each on a fresh copy of the run's trainable student graph,
`RUN/student-assembled.keras` (the assembled student before fine-tuning: its
BatchNormalization layers, and training-only layers such as Dropout or augmentation where
the teacher had them; never `student.keras`, whose BNs are folded into the convs for
inference), with the same layers and new weights:

- `kd`: whole-model knowledge distillation with keras.distillation.Distiller, the teacher
  running live, Hinton's loss at the run's temperature and alpha;
- `scratch`: the student graph trained on labels alone.

Both follow one recipe (`train_within_budget`): Adam, a cosine decay over the epochs that
fit the budget (re-estimated after every epoch from the epochs' measured times; the rate
never rises when the estimate grows), the
validation accuracy after each epoch, the best epoch's weights kept, the test split read
once at the end. Data are read as everywhere else: in-memory arrays as they are, image
folders and HDF5 a batch at a time (data/images.keras_batches).

A baseline whose best validation or test accuracy stayed at chance (`at_chance`) did not
learn in its budget: a margin over it measures the baseline's handicap, not the method's
gain, and the command and report say so instead of presenting one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from pbkd_mpi.config import FinetuneConfig
from pbkd_mpi.data.images import keras_batches
from pbkd_mpi.errors import UserError
from pbkd_mpi.finetune.train import learning_rate
from pbkd_mpi.model.evaluate import accuracy
from pbkd_mpi.model.logits import logits_model
from pbkd_mpi.schedule.whole_run import PHASE_SCALING

METHODS = ("kd", "scratch")


def fresh_copy(model):
    """`model`'s graph with newly initialised weights (each layer's own initialisers)."""
    import keras

    return keras.models.clone_model(model)


def kd_model(teacher, student, temperature: float, alpha: float, rate: float):
    """A compiled keras.distillation.Distiller training `student` on `teacher`'s soft
    targets: alpha x T^2 x KL(teacher || student) + (1 - alpha) x cross-entropy on labels,
    the loss finetune.train.make_loss computes from cached logits.

    Both models enter as logit twins (model/logits.logits_model), and the KL term is a
    `keras.losses.KLDivergence()` instance: with the default `loss="kl_divergence"` Keras
    3.15 resolves a plain function that skips the softmax and compares raw logits / T, and
    the student stays at chance (tests/test_baselines.py guards this)."""
    import keras

    distiller = keras.distillation.Distiller(
        teacher=logits_model(teacher), student=logits_model(student),
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=temperature, loss=keras.losses.KLDivergence()),
        student_loss_weight=1.0 - alpha)
    distiller.compile(optimizer=keras.optimizers.Adam(rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return distiller


def scratch_model(student, rate: float):
    """`student`'s logit twin compiled for cross-entropy on labels."""
    import keras

    model = logits_model(student)
    model.compile(optimizer=keras.optimizers.Adam(rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def train_within_budget(trainable, student, dataset, budget_s: float, batch_size: int,
                        rate: float, seed: int, log=print, label: str = "",
                        clock=time.monotonic) -> dict:
    """Train `trainable` (a compiled model whose fit trains `student`'s variables) epoch by
    epoch while another epoch fits in `budget_s` wall seconds (at least one epoch runs);
    score `student` on validation after each, keep the best epoch's weights, and score it
    on the test split once. Returns the figures, with the validation curve against the
    seconds since training began."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = keras_batches(dataset.x_train, dataset.y_train, batch_size, shuffle=True, seed=seed)
    schedule = FinetuneConfig(learning_rate=rate, schedule="cosine")
    started = clock()
    epoch_seconds, curve, rates = [], [], []
    best_val, best_epoch, best_weights, planned = -1.0, 0, None, 1
    while True:
        epoch = len(epoch_seconds) + 1
        # A later estimate of more epochs would raise the cosine's rate again: it decays.
        rates.append(min(learning_rate(replace(schedule, epochs=planned), epoch),
                         rates[-1] if rates else rate))
        trainable.optimizer.learning_rate.assign(rates[-1])
        began = clock()
        trainable.fit(x, y, batch_size=batch_size if y is not None else None, epochs=1,
                      shuffle=True, verbose=0)
        val = accuracy(student, dataset.x_val, dataset.y_val)
        epoch_seconds.append(clock() - began)
        elapsed = clock() - started
        curve.append([elapsed, val])
        if val > best_val:
            best_val, best_epoch, best_weights = val, epoch, student.get_weights()
        # The first epoch traces the graph: later ones say what an epoch costs.
        typical = statistics.median(epoch_seconds[1:] or epoch_seconds)
        planned = epoch + int(max(0.0, budget_s - elapsed) // typical)
        log(f"{label}: epoch {epoch}/{planned}, validation accuracy {val:.4f} "
            f"({elapsed:.0f} s of {budget_s:.0f} s)")
        if epoch >= planned:
            break
    student.set_weights(best_weights)
    x_test, y_test = dataset.test_split()
    return {"budget_s": budget_s, "used_s": clock() - started, "epochs": len(epoch_seconds),
            "best_epoch": best_epoch, "val_accuracy": best_val,
            "test_accuracy": accuracy(student, x_test, y_test),
            "learning_rates": rates, "curve": curve}


def run_baseline(method: str, teacher, student_graph, dataset, budget_s: float, *,
                 batch_size: int, rate: float, temperature: float, alpha: float, seed: int,
                 log=print, label: str = "") -> dict:
    """One baseline (`kd` or `scratch`) on a fresh copy of `student_graph`."""
    student = fresh_copy(student_graph)
    if method == "kd":
        trainable = kd_model(teacher, student, temperature, alpha, rate)
    elif method == "scratch":
        trainable = scratch_model(student, rate)
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, received {method!r}")
    result = train_within_budget(trainable, logits_model(student), dataset, budget_s,
                                 batch_size, rate, seed, log=log, label=label or method)
    chance, bound = chance_bound(dataset.num_classes)
    return {"method": method, **result, "chance": chance, "chance_bound": bound,
            "at_chance": at_chance(min(result["val_accuracy"], result["test_accuracy"]),
                                   dataset.num_classes)}


# The phases that make the student once the teacher exists: a baseline gets their time.
METHOD_PHASES = tuple(PHASE_SCALING)  # the phases after the teacher


# How far above chance a baseline must get to count as having learned: 5% of the way from
# chance (1 / classes) to perfect accuracy, and never above twice chance (with many classes
# a few points are already far from chance). 10 classes: 0.145; 2: 0.525; 100: 0.02.
CHANCE_MARGIN = 0.05


def chance_bound(num_classes: int) -> tuple[float, float]:
    """(chance, the accuracy a baseline must exceed not to count as at chance)."""
    chance = 1.0 / num_classes
    return chance, min(chance + CHANCE_MARGIN * (1.0 - chance), 2.0 * chance)


def at_chance(accuracy: float, num_classes: int) -> bool:
    """Whether an accuracy is still at chance (at or below chance_bound). A baseline is
    judged on the lower of its best validation and its test accuracy: the best of many
    epochs on a small validation split can clear the bound by luck alone."""
    return accuracy <= chance_bound(num_classes)[1]


def chance_warning(row: dict, name: str) -> str:
    """The line that says a baseline stayed at chance (a row flagged `at_chance`)."""
    return (f"{name} stayed at chance: best validation accuracy {row['val_accuracy']:.3f}, "
            f"test {row['test_accuracy']:.3f} after {row['epochs']} epoch(s), chance "
            f"{row['chance']:.3f} (at or below {row['chance_bound']:.3f} counts as chance); "
            f"it did not learn in its budget, so a margin over it is not the method's gain.")


def method_seconds(report: dict) -> float:
    """The run's wall seconds after the teacher (its METHOD_PHASES), from report.json.
    Refused when the run reused work of an earlier run: its time would undercount."""
    reused = [what for what, flag in (
        ("the activation cache", (report.get("cache") or {}).get("reused")),
        (f"{(report.get('distill') or {}).get('reused_blocks')} block(s)",
         (report.get("distill") or {}).get("reused_blocks")),
        ("the fine-tuned student", (report.get("finetune") or {}).get("reused"))) if flag]
    if reused:
        raise UserError(
            f"the run reused {', '.join(reused)} of an earlier run, so its wall time "
            f"undercounts what the method costs. Give the budget yourself (--budget-s, e.g. "
            f"the first run's time) or use a run made from scratch (run --fresh).")
    return float(sum(report["phases"].get(name, 0.0) for name in METHOD_PHASES))
