"""Temperature scaling (Guo et al. 2017): one T > 0 per head, fitted on val, logits / T. Argmax is unchanged.

The val NLL of softmax(z / T) is convex in beta = 1 / T (a log-sum-exp of a linear function of beta minus a linear
term), so a golden-section search over log T on a bracket finds the minimum without scipy.
"""

from __future__ import annotations

import math

import numpy as np

from ltserve.heads.head import CalibratedHead
from ltserve.metrics import expected_calibration_error, softmax

T_MIN, T_MAX = 1e-2, 1e2


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T). logits (N, C), labels (N,)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX,
                    tol: float = 1e-4) -> float:
    """The T in [t_min, t_max] minimising the val NLL of softmax(logits / T).

    Args:
        logits: (N, C) uncalibrated val logits.
        labels: (N,) val labels.
        tol: stop when the log T bracket is narrower than this.

    Returns:
        T (a bound when the minimum lies outside the bracket, e.g. val that is 100 % correct pushes T down).
    """
    labels = np.asarray(labels, dtype=np.int64)
    lo, hi = math.log(t_min), math.log(t_max)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2.0))


def calibrate(head: CalibratedHead, val_features: np.ndarray, val_labels: np.ndarray) -> CalibratedHead:
    """Fit the head's temperature on val and record ECE and NLL before and after in meta["calibration"].

    Args:
        head: any head (its current temperature is replaced, not compounded).
        val_features: (N, D) val features.
        val_labels: (N,) val labels.

    Returns:
        the same head with `temperature` set (weights unchanged; export folds W / T and b / T).
    """
    raw = head.transform(val_features) @ head.weight.T + head.bias
    t = fit_temperature(raw, val_labels)
    before = expected_calibration_error(softmax(raw), val_labels)
    after = expected_calibration_error(softmax(raw / t), val_labels)
    info = {"temperature": t, "val_ece_before": before, "val_ece_after": after,
            "val_nll_before": nll(raw, val_labels), "val_nll_after": nll(raw, val_labels, t)}
    return head.with_temperature(t, calibration=info)
