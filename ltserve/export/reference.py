"""What export checks a package against: real images of the run's test split, and the unfolded head's logits.

The reference is each method's own formula from the head's recorded parameters (the registry's `reference`:
joint W, b with tau / scales / tau_la; ncm the negative squared distance to the centroids), on the backbone's
features of the same images, then + log pi_target (when stored) and / T. It never reads the folded layer (except
crt's, which is a re-trained layer).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ltserve.config import DataConfig
from ltserve.data import ImageSet, stratified_subsample
from ltserve.errors import PackageError, RunError
from ltserve.features.cache import splits_for
from ltserve.heads import HEADS, PRIOR_KEY, CalibratedHead
from ltserve.preprocess import PreprocessSpec, to_model_input, transform_image


def unfolded_logits(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
                    class_counts: Sequence[int]) -> np.ndarray:
    """The head's logits from its method's definition (the registry's reference), + target prior, / T.

    Args:
        head: the head to reconstruct.
        joint: the run's joint head (W0, b0; its own target prior and temperature are not used).
        features: (N, D) pooled backbone features.
        class_counts: (C,) training counts.

    Returns:
        (N, C) float64 logits.

    Raises:
        PackageError: the head's files lack a parameter its method needs.
    """
    try:
        z = HEADS.get(head.method).reference(head, joint, np.asarray(features, np.float64), class_counts)
    except RunError as exc:
        raise PackageError(str(exc)) from None
    shift = head.extras.get(PRIOR_KEY)
    if shift is not None:
        z = z + shift.astype(np.float64)
    return z / head.temperature


def backbone_features(backbone: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Pooled backbone features (N, D) float64 of model input (N, C, H, W), no grad."""
    with torch.no_grad():
        return torch.cat([backbone.forward_head(backbone.forward_features(torch.from_numpy(np.array(x[i:i + batch]))),
                                                pre_logits=True) for i in range(0, len(x), batch)]).double().numpy()


def verification_split(data: DataConfig) -> tuple[str, ImageSet, str]:
    """(split name, its images, data fingerprint): the split export verifies on, test, else val.

    Raises:
        RunError: the data set has neither.
    """
    splits = splits_for(data)  # shared with the feature cache (once per process)
    split, images = ("test", splits.test) if splits.test is not None and len(splits.test) else ("val", splits.val)
    if images is None or len(images) == 0:
        raise RunError("the run's data set has no test or val images to verify an export on")
    return split, images, splits.fingerprint


@functools.lru_cache(maxsize=4)
def verification_images(data_json: str, spec_json: str, n: int) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(images float32 NCHW (n, C, H, W), labels (n,), split name, data fingerprint); cached (read-only)."""
    split, images, fingerprint = verification_split(DataConfig.model_validate_json(data_json))
    idx = stratified_subsample(images.labels, n, seed=0)  # every class represented, for the shot-group check
    spec = PreprocessSpec.model_validate_json(spec_json)
    x = to_model_input([transform_image(images.load(int(i)), spec) for i in idx], spec)
    x.setflags(write=False)
    labels = images.labels[idx].copy()
    labels.setflags(write=False)
    return x, labels, split, fingerprint

