"""Classifier re-training, cRT (Kang et al. 2020, sec. 4): a fresh linear classifier on the frozen features,
trained with class-balanced sampling (SGD momentum, cosine lr), the best epoch chosen on val.

The reference logits are the layer itself: a re-trained layer has no formula to recompute it from the joint head.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from pydantic import Field

from ltserve.heads.common import Val
from ltserve.heads.head import CalibratedHead, raw_bias
from ltserve.heads.sgd import SgdFitter, SgdSettings

if TYPE_CHECKING:
    from torch import nn


class CrtSettings(SgdSettings):
    """`rebalance.crt`: the paper trains 10 epochs (iNaturalist 30) at lr 0.2."""

    epochs: int = Field(10, ge=1)


def init_linear(num_features: int, num_classes: int, seed: int) -> nn.Linear:
    """A linear layer with PyTorch's default initialisation, drawn from its own seeded generator.

    The global torch RNG is left alone, so the result depends on `seed` only.
    """
    import torch
    from torch import nn

    layer = nn.Linear(num_features, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=g)
        bound = 1.0 / math.sqrt(num_features)
        layer.bias.uniform_(-bound, bound, generator=g)
    return layer


class CRT(SgdFitter):
    """Re-initialised linear classifier trained on frozen features with class-balanced sampling."""

    Settings = CrtSettings
    name = "crt"

    def fit(self, train_features: Any, train_labels: np.ndarray, base_head: CalibratedHead,
            val: Val) -> CalibratedHead:
        """Train the classifier and return its best epoch on val.

        Args:
            train_features: (N, D) cached training features, or a FeatureSource (augmented images through the
                frozen backbone, `--no-cache`).
            train_labels: (N,) training labels.
            base_head: gives C and D only; its weights are not used (the new layer reads raw features).
            val: (features (M, D), labels (M,)) val split; picks the best epoch.

        Returns:
            a head named "crt" with meta {recipe..., best_epoch, selection_metric, epochs_curve (per-epoch val
            curve), features ("cached" or "augmented")}.
        """
        state, meta = self.fit_module(init_linear(base_head.num_features, base_head.num_classes, self.seed),
                                      train_features, train_labels, base_head, val)
        return CalibratedHead(weight=state["weight"].cpu().numpy(), bias=state["bias"].cpu().numpy(),
                              method=self.name, meta=meta)


def reference(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
              class_counts: Sequence[int]) -> np.ndarray:
    """x W^T + b of the re-trained layer (before the target prior). (N, D) -> (N, C) float64."""
    return np.asarray(features, np.float64) @ head.weight.astype(np.float64).T + raw_bias(head)
