"""tau-normalisation (Kang et al. 2020, sec. 4): rescale each class's weight row by its norm to the power tau.

    W'_j = W_j / max(||W_j||, eps)^tau,   b' = 0 (the official code drops the bias) or b (`keep_bias`)

No training. tau = 0 with keep_bias is the joint classifier, tau = 1 plain L2 normalisation. tau is picked on val by
a sweep over `tau_grid` (the official code only sweeps and picks nothing); a fixed `tau` skips the choice but the
sweep is still recorded, so the Figure-2 curve is always available.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import Field

from ltserve.heads.common import (HeadFitter, MethodSettings, Val, ValScorer, check_features, class_counts, head_param,
                                  linear_logits, recorded, sweep)
from ltserve.heads.head import L2_EPS, CalibratedHead, raw_bias

log = logging.getLogger(__name__)


class TauNormSettings(MethodSettings):
    """`rebalance.tau_norm`.

    Attributes:
        tau: fixed tau; None picks it on val from `tau_grid`.
        tau_grid: the sweep grid (the paper's 0..2 in steps of 0.1 by default).
        keep_bias: keep the joint bias instead of dropping it.
    """

    tau: float | None = Field(None, description="fixed tau; None sweeps tau_grid on val")
    tau_grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])
    keep_bias: bool = False


def tau_normalise(weight: np.ndarray, bias: np.ndarray, tau: float, keep_bias: bool = False,
                  eps: float = L2_EPS) -> tuple[np.ndarray, np.ndarray]:
    """The tau-norm weight transform.

    Args:
        weight: (C, D) joint weights.
        bias: (C,) joint bias.
        tau: the exponent (0: unchanged, 1: unit rows).
        keep_bias: keep b unchanged instead of dropping it.
        eps: floor on the row norm (a zero row stays zero instead of dividing by 0).

    Returns:
        (W', b'), float32 (C, D) and (C,).
    """
    w = np.asarray(weight, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(w, axis=1, keepdims=True), eps)
    w_new = w / norms**tau
    b_new = np.asarray(bias, dtype=np.float64) if keep_bias else np.zeros(w.shape[0])
    return w_new.astype(np.float32), b_new.astype(np.float32)


class TauNorm(HeadFitter):
    """tau-normalised classifier on the frozen joint head (settings: `TauNormSettings`)."""

    Settings = TauNormSettings
    name = "tau_norm"

    def fit(self, train_features: np.ndarray | None, train_labels: np.ndarray, base_head: CalibratedHead,
            val: Val) -> CalibratedHead:
        """Sweep tau on val and return the tau-normalised head.

        Args:
            train_features: unused (tau-norm needs no training; may be None).
            train_labels: (N,) training labels, for the shot groups of the sweep.
            base_head: the joint head (its weight, bias and feature transform; its temperature is ignored).
            val: (features (M, D), labels (M,)) val split.

        Returns:
            a head named "tau_norm" with meta {tau, tau_source, keep_bias, selection_metric, sweep} and extras
            {"base_norms": ||W_j|| (C,)}.
        """
        start = time.perf_counter()
        c, d = base_head.weight.shape
        counts = class_counts(train_labels, c)
        vx, vy = check_features(*val, num_classes=c, num_features=d, where="val")
        vx = base_head.transform(vx)
        scorer = ValScorer(vy, counts, self.many_threshold, self.few_threshold)
        fixed, keep_bias = self.settings.tau, self.settings.keep_bias
        grid = [float(t) for t in self.settings.tau_grid]
        if fixed is not None and float(fixed) not in grid:
            grid = sorted(grid + [float(fixed)])

        def logits_for(tau: float) -> np.ndarray:
            return linear_logits(vx, *tau_normalise(base_head.weight, base_head.bias, tau, keep_bias))

        best, curve = sweep("tau", grid, logits_for, scorer)
        tau = float(fixed) if fixed is not None else grid[best]
        weight, bias = tau_normalise(base_head.weight, base_head.bias, tau, keep_bias)
        log.info("tau_norm: tau=%.2f (%s), val %s %.4f", tau, "fixed" if fixed is not None else "swept",
                 scorer.metric, curve[grid.index(tau)]["score"])
        meta = {
            "tau": tau,
            "tau_source": "fixed" if fixed is not None else "sweep",
            "keep_bias": keep_bias,
            "selection_metric": scorer.metric,
            "sweep": curve,
            "fit_seconds": time.perf_counter() - start,
        }
        norms = np.linalg.norm(base_head.weight.astype(np.float64), axis=1).astype(np.float32)
        return replace(base_head, weight=weight, bias=bias, method=self.name, temperature=1.0, meta=meta,
                       extras={"base_norms": norms})


def reference(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
              class_counts: Sequence[int]) -> np.ndarray:
    """W0_j / ||W0_j||^tau (and b0 or 0) from the joint head and the head's tau. (N, D) -> (N, C) float64."""
    w0 = joint.weight.astype(np.float64)
    w = w0 / np.maximum(np.linalg.norm(w0, axis=1, keepdims=True), L2_EPS) ** float(head_param(head, "tau"))
    b = raw_bias(joint) if bool(head_param(head, "keep_bias")) else np.zeros(len(w0))
    return np.asarray(features, np.float64) @ w.T + b


def params(head: CalibratedHead) -> dict[str, Any]:
    """model.json's record of a tau-norm head: tau, where it came from, keep_bias, the val metric that chose it."""
    return recorded(head, ("tau", "tau_source", "keep_bias", "selection_metric"))


def chosen(meta: Mapping[str, Any]) -> list[str]:
    """What val chose, in words: ["tau=0.7"]."""
    return [f"tau={meta['tau']:g}"] if "tau" in meta else []
