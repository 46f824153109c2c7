"""The numbers behind the reliability diagram and the confusion matrix of an evaluation (NumPy only).

    reliability_curve(probs, labels)          confidence bins: mean confidence, accuracy, count; the ECE they sum to
    confusion_matrix(pred, labels, order)     row-normalised (true class -> predicted), classes head to tail

Both go into `eval/<split>.json` (`results["reliability"]`, `results["confusion"]`) besides being drawn, so the
figures can be checked and redrawn from the report alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

RELIABILITY_BINS = 15
"""Equal-width confidence bins: the binning of `ltserve.metrics.expected_calibration_error`, so the diagram's ECE is
the reports' ECE."""
CONFUSION_JSON_MAX_CLASSES = 100
"""Above this many classes the JSON keeps only each class's row total and recall (a 1000 x 1000 matrix per head
would be megabytes of JSON); the PNG still shows the whole matrix."""


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Top-1 confidence against top-1 accuracy in equal-width confidence bins.

    Args:
        probs: (N, C) softmax probabilities (the head's, after its calibration temperature: what is served).
        labels: (N,) int true classes.
        bins: number of equal-width bins over (0, 1]; a bin holds confidences in (lo, hi].

    Returns:
        {"edges": bins + 1 floats, "count": images per bin, "confidence": mean confidence per bin, "accuracy":
        accuracy per bin (None for an empty bin), "ece": sum over bins of count/N * |accuracy - confidence|,
        "n": N}.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    count, confidence, accuracy = [], [], []
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        k = int(mask.sum())
        count.append(k)
        if k:
            c, a = float(conf[mask].mean()), float(correct[mask].mean())
            ece += k / max(labels.size, 1) * abs(a - c)
            confidence.append(c)
            accuracy.append(a)
        else:
            confidence.append(None)
            accuracy.append(None)
    return {"edges": [float(e) for e in edges], "count": count, "confidence": confidence, "accuracy": accuracy,
            "ece": float(ece), "n": int(labels.size)}


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, order: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised confusion matrix with rows and columns in `order`.

    Args:
        pred: (N,) predicted classes.
        labels: (N,) true classes.
        order: (C,) class indices in display order (head to tail: `figures.head_to_tail`).

    Returns:
        (matrix (C, C) float64: entry [i, j] = the share of true class order[i]'s images predicted as order[j],
        each row summing to 1; NaN rows for a class with no image), (row totals (C,) int64: images per true class).
    """
    order = np.asarray(order, dtype=np.int64)
    c = order.size
    counts = np.zeros((c, c), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    counts = counts[np.ix_(order, order)]
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(totals[:, None] > 0, counts / np.maximum(totals, 1)[:, None], np.nan)
    return matrix, totals


def confusion_entry(matrix: np.ndarray, totals: np.ndarray, order: Sequence[int],
                    class_names: Sequence[str]) -> dict[str, Any]:
    """One head's confusion matrix as `eval/<split>.json` holds it.

    Returns:
        {"order": class indices head to tail, "class_names": the same order, "row_totals", "recall" (the diagonal,
        None for a class without images), and "matrix" (rows as lists, None for an empty row) when there are at most
        `CONFUSION_JSON_MAX_CLASSES` classes}.
    """
    diag = np.diag(matrix)
    entry: dict[str, Any] = {
        "order": [int(j) for j in order], "class_names": [class_names[j] for j in order],
        "row_totals": [int(t) for t in totals],
        "recall": [None if np.isnan(v) else float(v) for v in diag],
    }
    if len(order) <= CONFUSION_JSON_MAX_CLASSES:
        entry["matrix"] = [None if np.isnan(row).any() else [float(v) for v in row] for row in matrix]
    return entry
