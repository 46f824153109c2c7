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
from ltserve.rebalance._train import as_source, resolve_device, train_on_features

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


class LWS:
    """Per-class scales on the frozen joint classifier, trained with class-balanced sampling.

    Args:
        epochs: training epochs (the paper: 5); each has floor(N / batch_size) steps.
        lr: initial lr, cosine-annealed per step to 0.
        batch_size: images per step.
        weight_decay, momentum: SGD settings (weight decay acts on the scales, as in the official code).
        sampler: stage-2 sampler, "cb" in the paper.
        images_per_class: consecutive images per drawn class for "cb".
        seed: sampling seed.
        device: "auto" (cuda when available), "cpu" or "cuda".
        many_threshold, few_threshold: shot groups of the recorded val curve.
        progress: show a tqdm bar.
    """

    name = "lws"

    def __init__(self, epochs: int = 5, lr: float = 0.2, batch_size: int = 512, weight_decay: float = 5e-4,
                 momentum: float = 0.9, sampler: str = "cb", images_per_class: int = 4, seed: int = 0,
                 device: str = "auto", many_threshold: int = 100, few_threshold: int = 20, progress: bool = True):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.sampler = sampler
        self.images_per_class = images_per_class
        self.seed = seed
        self.device = device
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        self.progress = progress

    def settings(self) -> dict[str, Any]:
        """The recipe, for meta."""
        return {k: getattr(self, k) for k in ("epochs", "lr", "batch_size", "weight_decay", "momentum", "sampler",
                                              "images_per_class", "seed")}

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
