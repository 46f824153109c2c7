"""Nearest class mean (Kang et al. 2020, sec. 4): classify by the distance to each class's mean feature.

Features are centred on the mean training feature mu and L2-normalised, x' = (x - mu) / ||x - mu||; the class
centroid c_j is the mean of class j's normalised training features (not re-normalised). Folded into one linear layer:

    euclidean: -||x' - c_j||^2 = 2 c_j . x' - ||c_j||^2 - ||x'||^2, the last term equal for every class, so
               W = 2C, b_j = -||c_j||^2 gives the same argmax and softmax;
    cosine:    W_j = c_j / ||c_j||, b = 0 (the dot product with the unit feature).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal, Sequence

import numpy as np

from ltserve.heads.common import (HeadFitter, MethodSettings, Val, check_features, class_counts, head_extra,
                                  recorded)
from ltserve.heads.head import L2_EPS, CalibratedHead

log = logging.getLogger(__name__)


def centred_l2(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(x - mu) / max(||x - mu||, eps), in float64. (N, D) -> (N, D)."""
    x = np.asarray(features, dtype=np.float64) - np.asarray(centre, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), L2_EPS)


class NcmSettings(MethodSettings):
    """`rebalance.ncm`: the distance to the class means."""

    metric: Literal["euclidean", "cosine"] = "euclidean"


class NCM(HeadFitter):
    """Nearest-class-mean classifier on centred, L2-normalised features (settings: `NcmSettings`)."""

    Settings = NcmSettings
    name = "ncm"

    def fit(self, train_features: np.ndarray, train_labels: np.ndarray, base_head: CalibratedHead,
            val: Val | None = None) -> CalibratedHead:
        """Compute mu and the class centroids and fold them into a head.

        Args:
            train_features: (N, D) training features (un-augmented, from the cache).
            train_labels: (N,) training labels; every class needs at least one image.
            base_head: gives C and D only (NCM ignores the joint weights).
            val: unused (nothing to choose); accepted for the common interface.

        Returns:
            a head named "ncm", feature_transform "centred_l2" with centre mu, meta {metric}, extras
            {"centroids": C (C, D)}.

        Raises:
            ValueError: bad shapes, or a class without a training image.
        """
        metric = self.settings.metric
        start = time.perf_counter()
        c, d = base_head.weight.shape
        x, y = check_features(train_features, train_labels, c, d, "train")
        counts = class_counts(y, c)
        mu = x.astype(np.float64).mean(axis=0)
        xn = centred_l2(x, mu)
        sums = np.zeros((c, d))
        np.add.at(sums, y, xn)
        centroids = sums / counts[:, None]
        if metric == "euclidean":
            weight, bias = 2.0 * centroids, -np.sum(centroids**2, axis=1)
        else:
            weight = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), L2_EPS)
            bias = np.zeros(c)
        log.info("ncm: %s metric, %d centroids of dim %d", metric, c, d)
        return CalibratedHead(
            weight=weight, bias=bias, method=self.name, feature_transform="centred_l2", centre=mu,
            meta={"metric": metric, "fit_seconds": time.perf_counter() - start},
            extras={"centroids": centroids.astype(np.float32)},
        )


def reference(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
              class_counts: Sequence[int]) -> np.ndarray:
    """-||x' - c_j||^2 (euclidean) or x' . c_j / ||c_j|| (cosine), x' the centred, L2-normalised features.

    Equal to the folded layer only up to a per-row constant (-||x'||^2) for euclidean. (N, D) -> (N, C) float64.
    """
    x = centred_l2(features, head.centre)
    centroids = head_extra(head, "centroids").astype(np.float64)
    if head.meta.get("metric", "euclidean") == "cosine":
        return x @ (centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), L2_EPS)).T
    # row chunks bound memory at (chunk, C, D); the direct difference (not the folded expansion) is the reference
    out = np.empty((len(x), len(centroids)))
    for start in range(0, len(x), 16):
        out[start:start + 16] = -((x[start:start + 16, None, :] - centroids[None]) ** 2).sum(-1)
    return out


def params(head: CalibratedHead) -> dict[str, Any]:
    """model.json's record of an ncm head: its metric (the centre and centroids are in the graph)."""
    return recorded(head, ("metric",))


def exact(head: CalibratedHead) -> bool:
    """Whether the folded layer equals `reference` exactly: cosine yes; euclidean only up to a per-row constant
    (-||x'||^2, the same for every class, so the same argmax and softmax)."""
    return head.meta.get("metric", "euclidean") != "euclidean"
