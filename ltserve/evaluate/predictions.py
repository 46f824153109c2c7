"""Per-image predictions of an evaluation, as CSV (header row) or JSONL (one object per line) by the file suffix."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltserve.errors import ConfigError
from ltserve.fileio import atomic_write
from ltserve.metrics import softmax


def write_predictions(path: str | Path, labels: np.ndarray, logits: np.ndarray | Mapping[str, np.ndarray],
                      class_names: Sequence[str] | None = None) -> Path:
    """One row per image: index, label, then the predictions.

    Args:
        path: a .csv or .jsonl file.
        labels: (N,) true labels.
        logits: (N, C) of one model (columns `pred`, `pred_name` with `class_names`, `probability`), or
            {head: (N, C)} of a run's heads (columns `pred_<head>`, `prob_<head>` for each head).
        class_names: C names, for the `pred_name` column of one model.

    Raises:
        ConfigError: a suffix other than .csv or .jsonl.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"--predictions {path}: use a .csv or .jsonl file name")
    columns: dict[str, list[Any]] = {"index": np.arange(len(labels)).tolist(), "label": np.asarray(labels).tolist()}
    if isinstance(logits, Mapping):
        for head, z in logits.items():
            pred, prob = _top1(z)
            columns.update({f"pred_{head}": pred.tolist(), f"prob_{head}": prob})
    else:
        pred, prob = _top1(logits)
        columns["pred"] = pred.tolist()
        if class_names is not None:
            columns["pred_name"] = [class_names[j] for j in pred]
        columns["probability"] = prob
    names = list(columns)
    rows = [[columns[c][i] for c in names] for i in range(len(labels))]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if suffix == ".csv":
                writer = csv.writer(f)
                writer.writerow(names)
                writer.writerows(rows)
            else:
                f.writelines(json.dumps(dict(zip(names, row))) + "\n" for row in rows)

    return atomic_write(path, write)


def _top1(logits: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(argmax (N,), softmax probability of it, rounded to 6 digits)."""
    probs = softmax(logits)
    pred = probs.argmax(axis=1)
    return pred, [round(float(p), 6) for p in probs[np.arange(len(pred)), pred]]
