"""The exported model: backbone -> (ncm only: x -> (x - mu) / max(||x - mu||, eps)) -> one Gemm -> logits."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ltserve.heads import L2_EPS, CalibratedHead


class CentredL2(nn.Module):
    """x -> (x - mu) / max(||x - mu||, eps): ncm's fixed feature normalisation. (N, D) -> (N, D)."""

    def __init__(self, centre: np.ndarray):
        super().__init__()
        self.register_buffer("centre", torch.as_tensor(np.asarray(centre, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.centre
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(L2_EPS)


class FoldedClassifier(nn.Module):
    """The exported model: backbone -> (optional CentredL2) -> nn.Linear with the folded (W / T, b / T).

    Input float32 NCHW (N, C_in, H, W); output (N, num_classes) calibrated logits.
    """

    def __init__(self, backbone: nn.Module, head: CalibratedHead):
        super().__init__()
        weight, bias = head.folded()
        self.backbone = backbone
        self.normalise: nn.Module = CentredL2(head.centre) if head.feature_transform == "centred_l2" else nn.Identity()
        self.fc = nn.Linear(head.num_features, head.num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.as_tensor(weight))
            self.fc.bias.copy_(torch.as_tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.fc(self.normalise(features))

