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
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from pydantic import Field

from ltserve.heads.common import (HeadFitter, MethodSettings, Val, ValScorer, check_features, class_counts,
                                  head_param, linear_logits, log_prior, recorded, sweep)
from ltserve.heads.head import CalibratedHead

log = logging.getLogger(__name__)

Reference = Callable[[CalibratedHead, CalibratedHead, np.ndarray, Sequence[int]], np.ndarray]
Params = Callable[[CalibratedHead], dict[str, Any]]
Chosen = Callable[[Mapping[str, Any]], list[str]]


class LaSettings(MethodSettings):
    """`rebalance.la` (shared by la, tau_norm+la and lws+la).

    Attributes:
        tau_la: fixed tau_la; None picks it on val from `tau_grid`.
        tau_grid: the sweep grid (0..3 in steps of 0.1 by default).
    """

    tau_la: float | None = Field(None, description="fixed tau_la; None sweeps tau_grid on val")
    tau_grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(31)])


def adjusted_method(base_method: str) -> str:
    """The head name of logit adjustment on `base_method`: joint -> la, tau_norm -> tau_norm+la, lws -> lws+la."""
    return "la" if base_method == "joint" else f"{base_method}+la"


class LogitAdjustment(HeadFitter):
    """Post-hoc logit adjustment on a fitted head (joint, tau_norm or lws), its weights fixed (`LaSettings`)."""

    Settings = LaSettings
    name = "la"

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
        fixed = self.settings.tau_la
        grid = [float(t) for t in self.settings.tau_grid]
        if fixed is not None and float(fixed) not in grid:
            grid = sorted(grid + [float(fixed)])

        def logits_for(tau_la: float) -> np.ndarray:
            return base_logits - (tau_la * lp).astype(np.float32)

        best, curve = sweep("tau_la", grid, logits_for, scorer)
        tau_la = float(fixed) if fixed is not None else grid[best]
        bias = base_head.bias.astype(np.float64) - tau_la * lp
        method = adjusted_method(base_head.method)
        log.info("%s: tau_la=%.2f (%s), val %s %.4f", method, tau_la, "fixed" if fixed is not None else "swept",
                 scorer.metric, curve[grid.index(tau_la)]["score"])
        base_meta = {k: v for k, v in base_head.meta.items()
                     if k not in ("sweep", "val", "epochs_curve", "calibration", "target_prior")}
        meta = {
            "tau_la": tau_la,
            "tau_la_source": "fixed" if fixed is not None else "sweep",
            "base": base_head.method,
            "base_meta": base_meta,
            "selection_metric": scorer.metric,
            "sweep": curve,
            "fit_seconds": time.perf_counter() - start,
        }
        extras = {**base_head.extras, "log_prior": lp.astype(np.float32)}
        return replace(base_head, bias=bias, method=method, temperature=1.0, meta=meta, extras=extras)


def adjusted(base_reference: Reference) -> Reference:
    """The reference logits of logit adjustment on a head whose own reference is `base_reference`:
    base logits - tau_la log pi_j, pi_j = n_j / N from the run's training counts."""

    def reference(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
                  class_counts: Sequence[int]) -> np.ndarray:
        counts = np.asarray(class_counts, dtype=np.float64)
        shift = float(head_param(head, "tau_la")) * np.log(counts / counts.sum())
        return base_reference(head, joint, features, class_counts) - shift

    return reference


def adjusted_params(base_params: Params) -> Params:
    """model.json's record of logit adjustment on a head whose own record is `base_params`: the base's parameters
    (read from meta["base_meta"], e.g. tau_norm+la's tau) with tau_la, its source, the base's name and the val metric
    over them."""

    def params(head: CalibratedHead) -> dict[str, Any]:
        base = replace(head, meta=dict(head.meta.get("base_meta") or {}))  # the base's meta; its extras are kept
        return {**base_params(base), **recorded(head, ("tau_la", "tau_la_source", "base", "selection_metric"))}

    return params


def adjusted_chosen(base_chosen: Chosen) -> Chosen:
    """What val chose for logit adjustment on a head whose own choice is `base_chosen`: ["tau=0.7", "tau_la=0.4"]."""

    def chosen(meta: Mapping[str, Any]) -> list[str]:
        own = [f"tau_la={meta['tau_la']:g}"] if "tau_la" in meta else []
        return [*base_chosen(meta.get("base_meta") or {}), *own]

    return chosen
