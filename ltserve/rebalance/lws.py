"""Learnable weight scaling, LWS (Kang et al. 2020, sec. 4): the joint W and b stay fixed; one scale f_j per class,
initialised to 1, is learnt with class-balanced sampling; logits_j = f_j (w_j . x + b_j) (the bias is scaled too).
Folded: W'_j = f_j W_j, b'_j = f_j b_j.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ltserve.heads import CalibratedHead
from ltserve.rebalance._common import Val, ValScorer, check_features, class_counts
from ltserve.rebalance._train import SgdHeadSettings, as_source, resolve_device, train_on_features

log = logging.getLogger(__name__)


class ScaledLinear(nn.Module):
    """logits = f * (x W^T + b) with W, b frozen buffers and f (C,) the only parameter."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(np.asarray(weight, dtype=np.float32)))
        self.register_buffer("bias", torch.as_tensor(np.asarray(bias, dtype=np.float32)))
        self.scales = nn.Parameter(torch.ones(self.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scales * (x @ self.weight.T + self.bias)


class LWS(SgdHeadSettings):
    """Per-class scales on the frozen joint classifier, trained with class-balanced sampling.

    Settings as in `SgdHeadSettings` (weight decay acts on the scales, as in the official code); the paper
    trains 5 epochs at lr 0.2.
    """

    name = "lws"

    def __init__(self, epochs: int = 5, **settings: Any):
        super().__init__(epochs=epochs, **settings)

    def fit(self, train_features: Any, train_labels: np.ndarray, base_head: CalibratedHead,
            val: Val) -> CalibratedHead:
        """Learn the scales and return the best epoch's head.

        Args:
            train_features: (N, D) cached training features, or a FeatureSource (`--no-cache`).
            train_labels: (N,) training labels.
            base_head: the joint head (W, b fixed; its temperature is ignored).
            val: (features (M, D), labels (M,)); picks the best epoch.

        Returns:
            a head named "lws" with W'_j = f_j W_j, b'_j = f_j b_j, extras {"scales": f (C,)}, meta {recipe...,
            best_epoch, selection_metric, epochs_curve, features}.
        """
        start = time.perf_counter()
        if base_head.feature_transform != "none":
            raise ValueError(f"lws scales a plain linear head; base head {base_head.method!r} has feature transform "
                             f"{base_head.feature_transform!r} (use the joint head)")
        c, d = base_head.weight.shape
        device = resolve_device(self.device)
        if isinstance(train_features, np.ndarray):
            train_features, train_labels = check_features(train_features, train_labels, c, d, "train")
        counts = class_counts(train_labels, c)
        vx, vy = check_features(*val, num_classes=c, num_features=d, where="val")
        scorer = ValScorer(vy, counts, self.many_threshold, self.few_threshold)
        source = as_source(train_features, device)
        model = ScaledLinear(base_head.weight, base_head.bias).to(device)
        val_t = torch.as_tensor(vx, device=device)
        state, curve, best = train_on_features(
            model, source, train_labels, val_t, scorer, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            weight_decay=self.weight_decay, momentum=self.momentum, sampler=self.sampler,
            images_per_class=self.images_per_class, seed=self.seed, desc="lws", progress=self.progress)
        f = state["scales"].cpu().numpy().astype(np.float64)
        log.info("lws: best epoch %d/%d, val %s %.4f, scales in [%.3f, %.3f]", best, self.epochs, scorer.metric,
                 curve[best - 1]["score"], f.min(), f.max())
        meta = {**self.settings(), "best_epoch": best, "selection_metric": scorer.metric, "epochs_curve": curve,
                "features": source.kind, "fit_seconds": time.perf_counter() - start}
        return CalibratedHead(weight=f[:, None] * base_head.weight, bias=f * base_head.bias, method=self.name,
                              meta=meta, extras={"scales": f.astype(np.float32)})
