"""Pieces every head method shares: the `HeadFitter` base, input checks, val scoring, sweeps, class priors.

NumPy and pydantic only (the torch training loop of crt and lws lives in `sgd.py`). Selection on val follows the paper's
protocol: "top-1 on a balanced val split", which is the mean per-class accuracy (balanced accuracy) whenever every
class has the same number of val images, so the score is top-1 on a balanced val split and balanced accuracy
otherwise (the two are the same number on a balanced split).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from ltserve.errors import RunError
from ltserve.heads.head import CalibratedHead
from ltserve.metrics import group_accuracy, per_class_accuracy, shot_groups

Val = tuple[np.ndarray, np.ndarray]


class MethodSettings(BaseModel):
    """A method's hyper-parameters: the `rebalance.<section>` of a recipe, and the only place their defaults live.

    Unknown keys are rejected (with the valid ones listed by `ltserve.config`)."""

    model_config = ConfigDict(extra="forbid")


class HeadFitter:
    """Base of every stage-2 method, in scikit-learn's shape: hyper-parameters in `__init__`, data only in `fit`.

    Args:
        settings: the method's settings section (a `Settings` instance or a dict); keyword arguments override it.
        seed: seed of initialisation and sampling (`rebalance.seed`).
        device: where torch methods train: "auto" (CUDA when available), "cpu" or "cuda".
        progress: show progress bars.
        many_threshold, few_threshold: shot groups of the recorded val curves (training counts).
        **overrides: settings fields, e.g. `CRT(epochs=4)`.

    Raises:
        pydantic.ValidationError: an unknown or invalid setting.
    """

    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    name: ClassVar[str] = "method"

    def __init__(self, settings: MethodSettings | dict[str, Any] | None = None, *, seed: int = 0,
                 device: str = "auto", progress: bool = True, many_threshold: int = 100, few_threshold: int = 20,
                 **overrides: Any) -> None:
        base = settings.model_dump() if isinstance(settings, BaseModel) else dict(settings or {})
        self.settings = self.Settings.model_validate({**base, **overrides})
        self.seed = seed
        self.device = device
        self.progress = progress
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold

    def fit(self, train_features: Any, train_labels: np.ndarray, base_head: CalibratedHead,
            val: Val) -> CalibratedHead:
        """Fit on training features (N, D) and labels (N,), starting from `base_head`; val (M, D), (M,) picks
        epochs and knobs. Returns the new head (no target prior, temperature 1)."""
        raise NotImplementedError


def check_features(features: np.ndarray, labels: np.ndarray, num_classes: int, num_features: int,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (features, labels) pair at a method's `fit` boundary.

    Args:
        features: (N, D) float.
        labels: (N,) int in [0, C).
        num_classes: C, from the base head.
        num_features: D, from the base head.
        where: what the pair is ("train", "val"), for the message.

    Returns:
        features as float32 (N, D) and labels as int64 (N,).

    Raises:
        ValueError: shapes, dtype or label range do not match the base head (the message says which).
    """
    x = np.asarray(features)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[1] != num_features:
        raise ValueError(f"{where} features must be (N, {num_features}) to match the base head, got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{where} labels must be ({x.shape[0]},), one per feature row, got {y.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{where} split is empty: stage 2 needs {where} images")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where} labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{where} labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    if not np.isfinite(x).all():
        raise ValueError(f"{where} features contain NaN or inf (a diverged backbone? re-extract the cache)")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def class_counts(labels: np.ndarray, num_classes: int, *, require_all: bool = True) -> np.ndarray:
    """Training images per class (C,) int64.

    Raises:
        ValueError: with `require_all`, a class has no training image (its prior log(0) and centroid are undefined).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if require_all and (counts == 0).any():
        empty = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"classes {empty} have no training image; every class needs at least one for stage 2")
    return counts


def log_prior(counts: np.ndarray) -> np.ndarray:
    """log pi_j with pi_j = n_j / N. (C,) -> (C,) float64."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log(counts / counts.sum())


def is_balanced(labels: np.ndarray, num_classes: int) -> bool:
    """True when every class has the same number of images in `labels`."""
    counts = np.bincount(labels, minlength=num_classes)
    return bool(counts.min() == counts.max())


def linear_logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x W^T + b. (N, D), (C, D), (C,) -> (N, C) float32."""
    return np.asarray(features, dtype=np.float32) @ np.asarray(weight, dtype=np.float32).T + bias.astype(np.float32)


class ValScorer:
    """Scores logits on one val split: the selection score plus Many/Medium/Few/All for the sweep curves.

    Args:
        labels: val labels (N,).
        counts: TRAINING count per class (C,), for the shot groups.
        many_threshold, few_threshold: shot-group thresholds on training counts.
    """

    def __init__(self, labels: np.ndarray, counts: np.ndarray, many_threshold: int = 100, few_threshold: int = 20):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(counts)
        self.groups = shot_groups(counts, many_threshold, few_threshold)
        self.metric = "top1" if is_balanced(self.labels, self.num_classes) else "balanced_accuracy"

    def __call__(self, logits: np.ndarray) -> dict[str, Any]:
        """(N, C) logits -> {score, top1, balanced_accuracy, many, medium, few} (groups None when empty)."""
        pred = np.asarray(logits).argmax(axis=1)
        pc = per_class_accuracy(pred, self.labels, self.num_classes)
        out: dict[str, Any] = {"top1": float(np.mean(pred == self.labels)), "balanced_accuracy": float(np.nanmean(pc))}
        out.update(group_accuracy(pc, self.groups))
        out["score"] = out[self.metric]
        return out


def sweep(name: str, values: Sequence[float], logits_for: Callable[[float], np.ndarray],
          scorer: ValScorer) -> tuple[int, list[dict[str, Any]]]:
    """Score every value of one knob on val and pick the best.

    Args:
        name: the knob ("tau", "tau_la"), used as the key of each curve point.
        values: the grid, in order.
        logits_for: value -> val logits (N, C).
        scorer: the val scorer.

    Returns:
        (index of the best value, curve): the curve has one dict per value ({name: v, score, top1,
        balanced_accuracy, many, medium, few}); the best is the first maximum of `score` (ties go to the smaller
        index, i.e. the earlier grid value).
    """
    if len(values) == 0:
        raise ValueError(f"the {name} grid is empty; give at least one value")
    curve = [{name: float(v), **scorer(logits_for(float(v)))} for v in values]
    best = int(np.argmax([p["score"] for p in curve]))
    return best, curve



def head_param(head: CalibratedHead, key: str) -> Any:
    """A head parameter from meta, or from meta["base_meta"] for compositions (tau_norm+la keeps tau there).

    Raises:
        RunError: the head's meta has no such parameter (a head file written by hand or by an old version).
    """
    for meta in (head.meta, head.meta.get("base_meta") or {}):
        if key in meta:
            return meta[key]
    raise RunError(f"heads/{head.method}.json: meta has no {key!r}, so the head cannot be recomputed from its "
                   f"method; re-fit it with `ltserve rebalance RUN --heads {head.method}`")


def head_extra(head: CalibratedHead, key: str) -> np.ndarray:
    """A named parameter array of a head (e.g. lws "scales").

    Raises:
        RunError: the head file has no such array.
    """
    if key not in head.extras:
        raise RunError(f"heads/{head.method}.safetensors: no extras.{key}, so the head cannot be recomputed from its "
                       f"method; re-fit it with `ltserve rebalance RUN --heads {head.method}`")
    return head.extras[key]


def recorded(head: CalibratedHead, keys: Sequence[str]) -> dict[str, Any]:
    """The parameters among `keys` that a head's meta records, for model.json (a key missing from an older head file
    is left out rather than invented)."""
    return {k: head.meta[k] for k in keys if k in head.meta}
