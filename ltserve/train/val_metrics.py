"""Stage 1's accuracy on val after every epoch, and the run's `metrics.csv`.

After each epoch, rank 0 runs the val split through the backbone in eval mode (the serving transform, as the feature
cache does) and scores the model's own linear layer, the joint head before calibration (a temperature never changes
the argmax): top-1, balanced accuracy (the mean of the per-class recalls) and the Many/Medium/Few accuracies, with
the run's shot groups (training counts against `data.many_threshold` / `data.few_threshold`, as every report uses).
The val split is small (a few images per class), so this costs a fraction of an epoch.

`RUN/metrics.csv` holds one row per epoch, rewritten whole after each one (a resumed run keeps the earlier rows,
which live in the checkpoint's history):

    epoch, lr, train_loss, val_top1, val_balanced, val_many, val_medium, val_few, seconds, val_seconds

Accuracies are fractions in [0, 1]; an empty shot group, or a run without a val split, leaves its cells empty.
`seconds` is the epoch's training time, `val_seconds` the time this evaluation took.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ltserve.config import Config
from ltserve.data import ImageSet
from ltserve.features.backbones import Classifier
from ltserve.features.extract import extract_features
from ltserve.fileio import atomic_write_text
from ltserve.metrics import classification_report
from ltserve.rundir import RunPaths

METRICS_CSV = "metrics.csv"
CSV_COLUMNS = ("epoch", "lr", "train_loss", "val_top1", "val_balanced", "val_many", "val_medium", "val_few",
               "seconds", "val_seconds")
VAL_KEYS = {"val_top1": "top1", "val_balanced": "balanced_accuracy", "val_many": "many", "val_medium": "medium",
            "val_few": "few"}
"""metrics.csv column -> key of the epoch's val report (`classification_report`)."""


@torch.no_grad()
def epoch_val_metrics(model: Classifier, val: ImageSet, cfg: Config, class_counts: Sequence[int],
                      device: torch.device) -> dict[str, Any] | None:
    """The joint head's accuracy on val with the current weights.

    Args:
        model: the bare model (not the DDP wrapper); its train/eval modes are restored afterwards.
        val: the val split.
        cfg: the recipe (preprocessing, eval batch size, workers, shot thresholds).
        class_counts: (C,) training images per class, for the shot groups.
        device: where the model is.

    Returns:
        {"top1", "balanced_accuracy", "many", "medium", "few" (None when the group has no class), "n",
        "seconds"}, or None when there is no val split.
    """
    if len(val) == 0:
        return None
    start = time.perf_counter()
    features = extract_features(model.backbone, val, cfg.preprocess, batch_size=cfg.train.eval_batch_size,
                                device=device, num_workers=cfg.train.num_workers, progress=False)
    logits = model.fc(torch.from_numpy(features).to(device)).float().cpu().numpy()
    report = classification_report(logits, val.labels, class_counts, cfg.data.many_threshold,
                                   cfg.data.few_threshold)
    out = {k: report[k] for k in ("top1", "balanced_accuracy", "many", "medium", "few", "n")}
    out["seconds"] = time.perf_counter() - start
    return out


def describe_val(val: dict[str, Any] | None) -> str:
    """The val part of an epoch's log line: "val top1 71.0 %, balanced 70.2 % (many 88.0, medium 65.1, few 40.0)"."""
    if val is None:
        return "no val split"

    def pct(v: float | None) -> str:
        return "empty" if v is None else f"{100.0 * v:.1f}"

    return (f"val top1 {pct(val['top1'])} %, balanced {pct(val['balanced_accuracy'])} % (many {pct(val['many'])}, "
            f"medium {pct(val['medium'])}, few {pct(val['few'])})")


def metrics_rows(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One metrics.csv row per epoch of the training history (None for a missing value)."""
    rows = []
    for h in history:
        val = h.get("val") or {}
        row: dict[str, Any] = {"epoch": h["epoch"], "lr": h["lr"], "train_loss": h["loss"],
                               "seconds": h["seconds"], "val_seconds": val.get("seconds")}
        row.update({col: val.get(key) for col, key in VAL_KEYS.items()})
        rows.append(row)
    return rows


def write_metrics_csv(paths: RunPaths, history: Sequence[dict[str, Any]]) -> Path:
    """Write `RUN/metrics.csv` (every epoch so far), atomically. Returns its path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in metrics_rows(history):
        writer.writerow({k: "" if v is None else _cell(v) for k, v in row.items()})
    path = paths.root / METRICS_CSV
    atomic_write_text(path, buf.getvalue())
    return path


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)
