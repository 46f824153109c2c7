"""Temperature scaling (Guo et al. 2017): one T > 0 per head, fitted on val, logits / T. Argmax is unchanged.

The val NLL of softmax(z / T) is convex in beta = 1 / T (a log-sum-exp of a linear function of beta minus a linear
term), so a golden-section search over log T on a bracket finds the minimum without scipy.

T minimises the NLL, but what the tables report (and what a user of the probabilities sees) is the ECE, and the
two disagree when a few confidently wrong val images dominate the NLL: the NLL-optimal T then flattens every other
prediction and the ECE rises (crt on a rho 400 Fashion-MNIST-LT run: test ECE 0.036 -> 0.090). So the fitted T is
kept only when it lowers the val ECE; otherwise the head keeps T = 1. Both ECEs, both NLLs and the decision are
recorded in meta["calibration"].

`fit_class_bias` measures what a temperature cannot fix, a class-wise bias, for label-shift estimation: export
records it in model.json (`label_shift`) when the val split shows one beyond chance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ltserve.heads.head import CalibratedHead
from ltserve.metrics import expected_calibration_error, softmax

log = logging.getLogger(__name__)

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
    """Fit the head's temperature on val; keep it only when it lowers the val ECE (else T = 1).

    Args:
        head: any head (its current temperature is replaced, not compounded).
        val_features: (N, D) val features.
        val_labels: (N,) val labels.

    Returns:
        the same head with `temperature` set (weights unchanged; export folds W / T and b / T) and
        meta["calibration"] = {temperature (the one applied), fitted_temperature (the val-NLL minimiser), applied,
        decision (in words), val_ece_before / _fitted / _after, val_nll_before / _fitted / _after} ("before": T = 1,
        "fitted": T = fitted_temperature, "after": the applied T).
    """
    labels = np.asarray(val_labels, dtype=np.int64)
    raw = head.uncalibrated_logits(val_features)
    fitted = fit_temperature(raw, labels)
    ece = {"before": expected_calibration_error(softmax(raw), labels),
           "fitted": expected_calibration_error(softmax(raw / fitted), labels)}
    loss = {"before": nll(raw, labels), "fitted": nll(raw, labels, fitted)}
    applied = ece["fitted"] < ece["before"]
    t = fitted if applied else 1.0
    ece["after"], loss["after"] = (ece["fitted"], loss["fitted"]) if applied else (ece["before"], loss["before"])
    change = f"val ECE {ece['before']:.4f} -> {ece['fitted']:.4f}"
    decision = (f"applied T = {fitted:.4g}: {change}" if applied
                else f"kept T = 1: the NLL-fitted T = {fitted:.4g} does not lower the val ECE ({change})")
    log.info("%s: calibration %s", head.method, decision)
    info = {"temperature": t, "fitted_temperature": fitted, "applied": applied, "decision": decision,
            **{f"val_ece_{k}": v for k, v in ece.items()}, **{f"val_nll_{k}": v for k, v in loss.items()}}
    return head.with_temperature(t, calibration=info)


# ---------------------------------------------------------------------------------------------------------------------
# Class-wise bias: what label-shift estimation needs on top of the temperature
# ---------------------------------------------------------------------------------------------------------------------

BIAS_ALPHA = 0.05
"""Significance level of the test that decides whether a head's class-wise bias is recorded (see `fit_class_bias`)."""


@dataclass(frozen=True)
class ClassBias:
    """Per-class logit offsets that make a head's probabilities calibrated class by class on a labelled split.

    Attributes:
        bias: (C,) nats, mean 0: the offsets to use (the shrunk fit when the test rejected, else zeros).
        fitted: (C,) the maximum-likelihood offsets before the test and the shrinkage.
        statistic: likelihood-ratio statistic 2 n (NLL(0) - NLL(fitted)), chi-square with C - 1 degrees of freedom
            when the head is calibrated class by class.
        dof: C - 1.
        p_value: of the statistic (Wilson-Hilferty approximation of the chi-square tail).
        shrinkage: the James-Stein factor max(0, 1 - (C - 3) / statistic) applied to `fitted`.
        applied: p_value < alpha: the split shows a class-wise bias beyond chance.
    """

    bias: np.ndarray
    fitted: np.ndarray
    statistic: float
    dof: int
    p_value: float
    shrinkage: float
    applied: bool


def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for X chi-square with `dof` degrees of freedom (Wilson-Hilferty: within ~1e-3 here; no scipy)."""
    if dof < 1:
        return 1.0
    if x <= 0:
        return 1.0
    k = float(dof)
    z = ((x / k) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / math.sqrt(2.0 / (9.0 * k))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def fit_class_bias(logits: np.ndarray, labels: np.ndarray, offset: np.ndarray | None = None,
                   alpha: float = BIAS_ALPHA, max_iter: int = 50) -> ClassBias:
    """Per-class offsets delta maximising the likelihood of softmax(logits + offset + delta) on a labelled split.

    EM label-shift estimation (Saerens et al. 2002) needs probabilities that are calibrated class by class, which a
    temperature alone does not give: a head that over-predicts a class makes EM over-estimate its share. The offsets
    are fitted by Newton's method (the NLL is convex in delta), tested against "no bias" with the likelihood-ratio
    statistic, and used only when the test rejects at `alpha` (a split of 20 images per class mostly measures its
    own noise otherwise), shrunk towards 0 by the James-Stein factor (Alexandari et al. 2020 fit such offsets with
    the temperature, "bias-corrected calibration", on larger splits).

    Args:
        logits: (N, C) the head's calibrated logits on the split.
        labels: (N,) int labels.
        offset: (C,) added before fitting (log(split prior / prior the head assumes)), default 0.
        alpha: significance level of the test.

    Returns:
        a `ClassBias`; all zeros, not applied, when a class has no image in the split (its offset is unbounded).
    """
    z = np.asarray(logits, dtype=np.float64) + (0.0 if offset is None else np.asarray(offset, dtype=np.float64))
    y = np.asarray(labels, dtype=np.int64)
    n, c = z.shape
    freq = np.bincount(y, minlength=c) / max(n, 1)
    zeros = np.zeros(c)
    if n == 0 or (freq <= 0).any():
        return ClassBias(zeros, zeros, 0.0, c - 1, 1.0, 0.0, False)

    def loss(d: np.ndarray) -> float:
        return nll(z + d, y)

    delta, current = zeros.copy(), loss(zeros)
    for _ in range(max_iter):
        q = softmax(z + delta)
        grad = q.mean(axis=0) - freq
        hess = np.diag(q.mean(axis=0)) - (q.T @ q) / n
        step = np.linalg.pinv(hess, hermitian=True) @ grad
        step -= step.mean()
        t = 1.0
        while t > 1e-4:  # damped Newton: halve until the NLL goes down
            trial = loss(delta - t * step)
            if trial < current:
                break
            t /= 2
        else:
            break
        delta, previous, current = delta - t * step, current, trial
        if previous - current < 1e-10:
            break
    delta -= delta.mean()
    statistic = max(0.0, 2.0 * n * (loss(zeros) - current))
    p_value = chi2_sf(statistic, c - 1)
    shrinkage = max(0.0, 1.0 - max(c - 3, 0) / statistic) if statistic > 0 else 0.0
    applied = p_value < alpha
    return ClassBias(delta * shrinkage if applied else zeros, delta, statistic, c - 1, p_value, shrinkage, applied)
