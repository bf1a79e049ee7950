"""The merged student (before fine-tuning) of finished runs against their teacher.

For each run directory: teacher and merged test accuracy (from report.json), the share of
test images on which the merged student predicts the teacher's class (`agreement`,
recomputed here from the run's teacher and `student-assembled.keras`), the replaced blocks'
parameter ratio, and the seconds of the distill, accept and chain phases. One JSON object
per run, one line each.

    python benchmarks/merged_figures.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def figures(run_dir: Path) -> dict:
    import numpy as np

    from pbkd_mpi.config import load_job
    from pbkd_mpi.data.dataset import load_dataset
    from pbkd_mpi.model.teacher import load_model_file

    report = json.loads((run_dir / "report.json").read_text())
    job = load_job(str(run_dir / "job.toml"))
    x_test, _ = load_dataset(job.data, job.run.seed).test_split()
    teacher = load_model_file(report["teacher"].get("file") or report["teacher"]["source"])
    merged = load_model_file(report["student"]["assembled_path"])
    ours = merged.predict(x_test, batch_size=256, verbose=0).argmax(1)
    theirs = teacher.predict(x_test, batch_size=256, verbose=0).argmax(1)
    chained = report.get("chained") or {}
    return {
        "run": str(run_dir),
        "teacher": report["teacher"]["accuracy"],
        "merged": report["student"]["accuracy_merged"],
        "agreement": float(np.mean(ours == theirs)),
        "param_ratio": report["replaced"]["param_ratio"],
        "chained_epochs": chained.get("epochs", 0),
        "phases_s": {k: round(report["phases"].get(k, 0.0), 1)
                     for k in ("distill", "accept", "chain")},
    }


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(figures(Path(arg))), flush=True)
