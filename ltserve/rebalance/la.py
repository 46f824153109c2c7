"""Post-hoc logit adjustment (Menon et al., ICLR 2021): subtract the scaled log training prior from the logits.

    b'_j = b_j - tau_la * log(pi_j),   pi_j = n_j / N (training counts)

On the joint head this is the "la" head; applied after tau-norm or LWS (their weights and bias fixed) it gives
"tau_norm+la" and "lws+la" (LWS: f_j b_j - tau_la log pi_j). tau_la is picked on val by a sweep over `tau_grid`,
or fixed. tau_la = 1 is the Bayes-optimal correction for a balanced test set when the base head's softmax estimates
the training posterior; the sweep lets val decide for heads that do not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Sequence

import numpy as np

from ltserve.heads import CalibratedHead
from ltserve.rebalance._common import Val, ValScorer, check_features, class_counts, linear_logits, log_prior, sweep

log = logging.getLogger(__name__)

DEFAULT_TAU_LA_GRID = tuple(round(0.1 * i, 1) for i in range(31))


def adjusted_method(base_method: str) -> str:
    """The head name of logit adjustment on `base_method`: joint -> la, tau_norm -> tau_norm+la, lws -> lws+la."""
    return "la" if base_method == "joint" else f"{base_method}+la"


class LogitAdjustment:
    """Post-hoc logit adjustment on a fitted head (joint, tau_norm or lws), its weights fixed.

    Args:
        tau_la: fixed tau_la; None picks it on val from `tau_grid`.
        tau_grid: the sweep grid (0..3 in steps of 0.1 by default).
        many_threshold, few_threshold: shot groups of the recorded sweep (training counts).
    """

    def __init__(self, tau_la: float | None = None, tau_grid: Sequence[float] = DEFAULT_TAU_LA_GRID,
                 many_threshold: int = 100, few_threshold: int = 20):
        self.tau_la = tau_la
        self.tau_grid = tau_grid
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold

    def fit(self, train_features: np.ndarray | None, train_labels: np.ndarray, base_head: CalibratedHead,
            val: Val) -> CalibratedHead:
        """Sweep tau_la on val and return the adjusted head.

        Args:
            train_features: unused (may be None); the prior comes from `train_labels`.
            train_labels: (N,) training labels: pi_j = n_j / N.
            base_head: the head to adjust, WITHOUT any target prior (its temperature is ignored); its method decides
                the name of the result (joint -> la, tau_norm -> tau_norm+la, lws -> lws+la).
            val: (features (M, D), labels (M,)).

        Returns:
            a head with bias b - tau_la log pi, meta {tau_la, tau_la_source, base, base_meta, selection_metric,
            sweep}, extras {"log_prior": log pi (C,)} plus the base head's extras.
        """
        start = time.perf_counter()
        c, d = base_head.weight.shape
        counts = class_counts(train_labels, c)
        lp = log_prior(counts)
        vx, vy = check_features(*val, num_classes=c, num_features=d, where="val")
        vx = base_head.transform(vx)
        scorer = ValScorer(vy, counts, self.many_threshold, self.few_threshold)
        base_logits = linear_logits(vx, base_head.weight, base_head.bias)
        grid = [float(t) for t in self.tau_grid]
        if self.tau_la is not None and float(self.tau_la) not in grid:
            grid = sorted(grid + [float(self.tau_la)])

        def logits_for(tau_la: float) -> np.ndarray:
            return base_logits - (tau_la * lp).astype(np.float32)

        best, curve = sweep("tau_la", grid, logits_for, scorer)
        tau_la = float(self.tau_la) if self.tau_la is not None else grid[best]
        bias = base_head.bias.astype(np.float64) - tau_la * lp
        method = adjusted_method(base_head.method)
        log.info("%s: tau_la=%.2f (%s), val %s %.4f", method, tau_la, "fixed" if self.tau_la is not None else "swept",
                 scorer.metric, curve[grid.index(tau_la)]["score"])
        base_meta = {k: v for k, v in base_head.meta.items()
                     if k not in ("sweep", "val", "epochs_curve", "calibration", "target_prior")}
        meta = {
            "tau_la": tau_la,
            "tau_la_source": "fixed" if self.tau_la is not None else "sweep",
            "base": base_head.method,
            "base_meta": base_meta,
            "selection_metric": scorer.metric,
            "sweep": curve,
            "fit_seconds": time.perf_counter() - start,
        }
        extras = {**base_head.extras, "log_prior": lp.astype(np.float32)}
        return replace(base_head, bias=bias, method=method, temperature=1.0, meta=meta, extras=extras)
