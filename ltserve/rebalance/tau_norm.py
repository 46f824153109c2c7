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
from typing import Sequence

import numpy as np

from ltserve.heads import L2_EPS, CalibratedHead
from ltserve.rebalance._common import Val, ValScorer, check_features, class_counts, linear_logits, sweep

log = logging.getLogger(__name__)

DEFAULT_TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))


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


class TauNorm:
    """tau-normalised classifier on the frozen joint head.

    Args:
        tau: fixed tau; None picks it on val from `tau_grid`.
        tau_grid: the sweep grid (the paper's 0..2 in steps of 0.1 by default).
        keep_bias: keep the joint bias instead of dropping it.
        many_threshold, few_threshold: shot groups of the recorded sweep (training counts).
    """

    name = "tau_norm"

    def __init__(self, tau: float | None = None, tau_grid: Sequence[float] = DEFAULT_TAU_GRID,
                 keep_bias: bool = False, many_threshold: int = 100, few_threshold: int = 20):
        self.tau = tau
        self.tau_grid = tau_grid
        self.keep_bias = keep_bias
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold

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
        grid = [float(t) for t in self.tau_grid]
        if self.tau is not None and float(self.tau) not in grid:
            grid = sorted(grid + [float(self.tau)])

        def logits_for(tau: float) -> np.ndarray:
            return linear_logits(vx, *tau_normalise(base_head.weight, base_head.bias, tau, self.keep_bias))

        best, curve = sweep("tau", grid, logits_for, scorer)
        tau = float(self.tau) if self.tau is not None else grid[best]
        weight, bias = tau_normalise(base_head.weight, base_head.bias, tau, self.keep_bias)
        log.info("tau_norm: tau=%.2f (%s), val %s %.4f", tau, "fixed" if self.tau is not None else "swept",
                 scorer.metric, curve[grid.index(tau)]["score"])
        meta = {
            "tau": tau,
            "tau_source": "fixed" if self.tau is not None else "sweep",
            "keep_bias": self.keep_bias,
            "selection_metric": scorer.metric,
            "sweep": curve,
            "fit_seconds": time.perf_counter() - start,
        }
        norms = np.linalg.norm(base_head.weight.astype(np.float64), axis=1).astype(np.float32)
        return replace(base_head, weight=weight, bias=bias, method=self.name, temperature=1.0, meta=meta,
                       extras={"base_norms": norms})
