"""Learnable weight scaling, LWS (Kang et al. 2020, sec. 4): the joint W and b stay fixed; one scale f_j per class,
initialised to 1, is learnt with class-balanced sampling; logits_j = f_j (w_j . x + b_j) (the bias is scaled too).
Folded: W'_j = f_j W_j, b'_j = f_j b_j.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from pydantic import Field

from ltserve.heads.common import Val, head_extra
from ltserve.heads.head import CalibratedHead, raw_bias
from ltserve.heads.sgd import SgdFitter, SgdSettings

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


class LwsSettings(SgdSettings):
    """`rebalance.lws`: the paper trains 5 epochs at lr 0.2 (weight decay acts on the scales, as in its code)."""

    epochs: int = Field(5, ge=1)


def scaled_linear(weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """logits = f * (x W^T + b) with W, b frozen buffers and f (C,), initialised to 1, the only parameter."""
    import torch
    from torch import nn

    class ScaledLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.as_tensor(np.asarray(weight, dtype=np.float32)))
            self.register_buffer("bias", torch.as_tensor(np.asarray(bias, dtype=np.float32)))
            self.scales = nn.Parameter(torch.ones(self.weight.shape[0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scales * (x @ self.weight.T + self.bias)

    return ScaledLinear()


class LWS(SgdFitter):
    """Per-class scales on the frozen joint classifier, trained with class-balanced sampling."""

    Settings = LwsSettings
    name = "lws"

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
        if base_head.feature_transform != "none":
            raise ValueError(f"lws scales a plain linear head; base head {base_head.method!r} has feature transform "
                             f"{base_head.feature_transform!r} (use the joint head)")
        state, meta = self.fit_module(scaled_linear(base_head.weight, base_head.bias), train_features, train_labels,
                                      base_head, val)
        f = state["scales"].cpu().numpy().astype(np.float64)
        log.info("lws: scales in [%.3f, %.3f]", f.min(), f.max())
        return CalibratedHead(weight=f[:, None] * base_head.weight, bias=f * base_head.bias, method=self.name,
                              meta=meta, extras={"scales": f.astype(np.float32)})


def reference(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
              class_counts: Sequence[int]) -> np.ndarray:
    """f_j (W0_j . x + b0_j) from the joint head and the learnt scales. (N, D) -> (N, C) float64."""
    f = head_extra(head, "scales").astype(np.float64)
    z = np.asarray(features, np.float64) @ joint.weight.astype(np.float64).T + raw_bias(joint)
    return f * z
