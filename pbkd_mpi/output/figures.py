"""The report's pictures (PNG, matplotlib), drawn from report.json alone.

Each function takes the report dict and a path and returns the path it wrote, or None when
the report has nothing to draw (e.g. every block reused, so there is no timeline).
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def timeline(report: dict, path: Path) -> Path | None:
    """One row per worker rank, a bar per block task (a split task: a bar on each of its ranks)."""
    tasks = (report.get("schedule") or {}).get("tasks")
    if tasks is None:  # a report from before the schedule section: one rank per block
        tasks = [{"name": b["name"], "ranks": [b["rank"]], "start_s": b["start_s"],
                  "end_s": b["end_s"], "estimated_s": None}
                 for b in report["blocks"] if not b["reused"] and b["start_s"] is not None]
    if not tasks:
        return None
    plt = _pyplot()
    ranks = sorted({r for t in tasks for r in t["ranks"]} | set(range(1, report["workers"] + 1)))
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(ranks) + 1.4))
    colours = plt.get_cmap("tab20")
    for i, task in enumerate(tasks):
        width = task["end_s"] - task["start_s"]
        for rank in task["ranks"]:
            y = ranks.index(rank)
            ax.barh(y, width, left=task["start_s"], height=0.6, color=colours(i % 20),
                    edgecolor="black", linewidth=0.5)
            ax.text(task["start_s"] + width / 2, y, task["name"], ha="center", va="center",
                    fontsize=8)
            if task.get("estimated_s"):  # where the schedule expected the task to end
                ax.plot([task["start_s"] + task["estimated_s"]] * 2, [y - 0.3, y + 0.3],
                        color="black", linewidth=1)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since rank 0 began handing out tasks (tick: estimated end)")
    distill = report["distill"]
    ax.axvline(distill["makespan_s"], color="grey", linestyle="--", linewidth=1)
    if distill.get("lower_bound_s"):
        ax.axvline(distill["lower_bound_s"], color="green", linestyle=":", linewidth=1)
    policy = (report.get("schedule") or {}).get("policy", "longest first")
    ax.set_title(f"Block tasks per worker, {policy} (makespan {distill['makespan_s']:.1f} s"
                 + (f", lower bound {distill['lower_bound_s']:.1f} s"
                    if distill.get("lower_bound_s") else "") + ")")
    return _save(fig, path)


def block_costs(report: dict, path: Path) -> Path | None:
    """Teacher vs student parameters and FLOPs per replaced block."""
    rows = report["blocks"]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [b["name"] for b in rows]
    x = range(len(rows))
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "flops", "FLOPs")):
        ax.bar([i - 0.2 for i in x], [b[f"teacher_{key}"] for b in rows], width=0.4,
               label="teacher")
        ax.bar([i + 0.2 for i in x], [b[f"student_{key}"] for b in rows], width=0.4,
               label="student")
        ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{label} per block")
        ax.legend()
    return _save(fig, path)


def block_losses(report: dict, path: Path) -> Path | None:
    """Validation MSE per epoch of each block, relative to its target's variance."""
    rows = [b for b in report["blocks"] if b["history"].get("val_loss")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for block in rows:
        variance = block["target_variance"] or 1.0
        values = [v / variance for v in block["history"]["val_loss"]]
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3,
                label=block["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE / target variance")
    ax.set_title("Block training")
    ax.legend(fontsize=8)
    return _save(fig, path)


def finetune_curves(report: dict, path: Path) -> Path | None:
    """Training and validation accuracy per epoch of fine-tuning."""
    history = report["finetune"].get("history") or {}
    if not history.get("val_accuracy"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, len(history["val_accuracy"]) + 1)
    for key in ("accuracy", "val_accuracy"):
        if key in history:
            ax.plot(epochs, history[key], marker="o", markersize=3, label=key)
    ax.axhline(report["teacher"]["accuracy"], color="grey", linestyle="--", linewidth=1,
               label="teacher (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("Fine-tuning the assembled student")
    ax.legend()
    return _save(fig, path)


def time_to_accuracy(report: dict, path: Path) -> Path | None:
    """Validation accuracy against wall seconds after the teacher: this run and the baselines."""
    baselines = report.get("baselines")
    finetune = report["finetune"]
    if not baselines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    # Fine-tuning's epochs at their training seconds, its set-up and validation put before
    # the first: the run's own curve, ending at its total.
    total = baselines["method_s"]
    start = total - sum(finetune.get("epoch_seconds") or [])
    times = [start]
    for seconds in finetune.get("epoch_seconds") or []:
        times.append(times[-1] + seconds)
    values = [finetune["val_accuracy_before"], *finetune["history"]["val_accuracy"]]
    ax.plot(times[:len(values)], values, marker="o", markersize=3, color="black",
            label="pbkd_mpi (merged, then fine-tuning)")
    names = {"kd": "whole-model KD", "scratch": "from scratch"}
    for row in baselines["results"]:
        seconds, accuracy = zip(*row["curve"]) if row["curve"] else ((), ())
        ax.plot(seconds, accuracy, marker=".", markersize=3,
                label=f"{names[row['method']]}, x{row['factor']:g} budget")
    ax.axhline(report["teacher"]["accuracy"], color="grey", linestyle="--", linewidth=1,
               label="teacher (test)")
    ax.set_xlabel("wall seconds after the teacher")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Time to accuracy")
    ax.legend(fontsize=8)
    return _save(fig, path)


FIGURES = {
    "timeline.png": timeline,
    "block_costs.png": block_costs,
    "block_losses.png": block_losses,
    "finetune.png": finetune_curves,
    "time_to_accuracy.png": time_to_accuracy,
}


def draw_all(report: dict, run_dir: Path) -> dict[str, str]:
    """Draw every figure the report has data for; returns {file name: caption key}."""
    drawn = {}
    for name, draw in FIGURES.items():
        if draw(report, Path(run_dir) / name) is not None:
            drawn[name] = draw.__doc__.strip().splitlines()[0]
    return drawn


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
