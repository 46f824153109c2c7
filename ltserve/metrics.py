"""Accuracy, shot groups and calibration, from logits or predictions (NumPy only).

Shot groups use TRAINING counts n_j: many n_j > many_threshold, medium few_threshold <= n_j <= many_threshold,
few n_j < few_threshold. A group's accuracy is the mean of its classes' per-class accuracies; a group with no
class is reported as None ("empty"), never as 0 %.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

ShotGroup = Literal["many", "medium", "few"]
SHOT_GROUPS: tuple[ShotGroup, ...] = ("many", "medium", "few")


def shot_groups(class_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20) -> list[ShotGroup]:
    """The shot group of every class from its training count."""
    groups: list[ShotGroup] = []
    for n in class_counts:
        groups.append("many" if n > many_threshold else "few" if n < few_threshold else "medium")
    return groups


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class (N,) -> (C,); NaN for a class with no test image."""
    correct = np.bincount(labels, weights=(pred == labels).astype(np.float64), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits. logits (N, C), labels (N,)."""
    k = min(k, logits.shape[1])
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins. probs (N, C) softmax probabilities, labels (N,)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(ece)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stability. (N, C) -> (N, C)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def round_distribution(p: np.ndarray | Sequence[float], digits: int = 6) -> list[float]:
    """A probability vector rounded to `digits` decimals that still sums to 1 as written.

    Rounding every share on its own leaves the sum a few units of the last digit off 1 (three shares of 1/3 write
    as 0.333333, 0.999999 in all). Here the shares are counted in units of 10**-digits, the remainder of the count
    goes to the largest share, and each value is written from its integer count: the written numbers add up to
    exactly 10**digits units (a prior a reader sums to check is 1 as written).

    Args:
        p: (C,) non-negative shares; normalised first when their sum is positive.
        digits: decimals kept (>= 0).

    Returns:
        C floats, each a multiple of 10**-digits, whose exact decimal sum is 1.

    Raises:
        ValueError: on a non-finite or negative share, or shares that sum to 0.
    """
    v = np.asarray(p, dtype=np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).all() or (v < 0).any() or v.sum() <= 0:
        raise ValueError(f"round_distribution: expected finite non-negative shares with a positive sum, got {v}")
    unit = 10 ** int(digits)
    counts = np.rint(v / v.sum() * unit).astype(np.int64)
    counts[int(np.argmax(v))] += unit - int(counts.sum())
    return [round(int(k) / unit, int(digits)) for k in counts]


def group_accuracy(per_class: np.ndarray, groups: Sequence[ShotGroup]) -> dict[str, float | None]:
    """Mean per-class accuracy in each shot group; None for an empty group (classes without test images skipped)."""
    out: dict[str, float | None] = {}
    g = np.asarray(groups)
    for name in SHOT_GROUPS:
        vals = per_class[(g == name) & ~np.isnan(per_class)]
        out[name] = float(vals.mean()) if vals.size else None
    return out


def classification_report(
    logits: np.ndarray, labels: np.ndarray, class_counts: Sequence[int], many_threshold: int = 100,
    few_threshold: int = 20, *, temperature: float | None = None,
) -> dict:
    """Every number ltserve reports for one head on one split.

    Args:
        logits: (N, C) float, calibrated (already divided by the head's temperature).
        labels: (N,) int.
        class_counts: training count of each class (C,), for the shot groups.
        temperature: the calibration temperature T the logits were divided by; when given, the report also holds
            ece_raw, the ECE before calibration (of softmax(logits * T)).

    Returns:
        dict with top1, top5, balanced_accuracy, many, medium, few (None when empty), ece_raw (only when
        `temperature` is given), ece (15 equal-width bins), per_class (list, NaN as None), n (images).
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = logits.shape[1]
    pred = logits.argmax(axis=1)
    pc = per_class_accuracy(pred, labels, num_classes)
    groups = group_accuracy(pc, shot_groups(class_counts, many_threshold, few_threshold))
    return {
        "n": int(labels.size),
        "top1": float(np.mean(pred == labels)),
        "top5": topk_accuracy(logits, labels, 5),
        "balanced_accuracy": float(np.nanmean(pc)),
        **groups,
        **({} if temperature is None else
           {"ece_raw": expected_calibration_error(softmax(np.asarray(logits, np.float64) * temperature), labels)}),
        "ece": expected_calibration_error(softmax(logits), labels),
        "per_class": [None if np.isnan(v) else float(v) for v in pc],
    }


def format_percent(value: float | None) -> str:
    """'63.2' for 0.632, 'empty' for None (an empty shot group)."""
    return "empty" if value is None else f"{100.0 * value:.1f}"
