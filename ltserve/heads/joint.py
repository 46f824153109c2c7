"""The joint head: stage 1's linear classifier, trained with the backbone (`ltserve.train`), the base of every
re-balanced head. Nothing to fit in stage 2; its reference logits are the plain layer."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ltserve.heads.head import CalibratedHead, raw_bias


def reference(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
              class_counts: Sequence[int]) -> np.ndarray:
    """x W0^T + b0 (before the target prior). (N, D) -> (N, C) float64."""
    return np.asarray(features, np.float64) @ joint.weight.astype(np.float64).T + raw_bias(joint)
