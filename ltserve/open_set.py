"""Open-set rejection: scores, their per-shot-group calibration, the score-choice rule, and open-set metrics
(NumPy only; export calibrates with it, the runtime applies it, evaluation and the benchmark measure it).

Every score is an *unknown-ness*: higher means less like the training classes, and an image is unknown when its
score exceeds the threshold of its predicted class (`thresholds[argmax logits]`).

    msp          1 - max softmax(logits)            the served logits already carry the head's temperature
    energy       -logsumexp(logits)                 Liu et al. 2020 (T folded into the logits)
    max_logit    -max logits                        Hendrycks et al. 2022
    ncm_cosine   1 - max_j cos(z, m_j)              z = L2(f - mu); m_j: unit class means of z on train
    mahalanobis  min_j (z - mu_j)^T P (z - mu_j)     same z; class means of z, P the inverse pooled covariance

f are the penultimate features (the package graph's `features` output), mu their training mean. The feature scores
need the features output and the `FeatureStats` export stores in model.onnx's metadata (`STATS_KEY`: the package
stays one graph file, and its sha256 covers them); older packages have logit scores only.

Calibration (`calibrate`): why per shot group. A tail class's logits are small, so its known images score as more
"unknown" under every logit score; one global threshold rejects rare-but-known images first. Here each shot group
(of the predicted class) gets its own threshold, the `target` quantile of the val images predicted into it, so that
a `target` share (default 95 %) of known val images is accepted in every group; a class with at least
`min_class_images` val images predicted into it gets its own threshold instead.

The score-choice rule (`choose_score`): export has no unknown images, so it cannot measure how well any score
separates unknowns from knowns. It picks the first score of `PREFERENCE` that the package can compute (the feature
scores need the graph's features output) and that val can calibrate (finite, not constant within any shot group
that has predicted images). `PREFERENCE` is the ranking `benchmarks/open_set.py` measured (near and far unknowns,
every head, 3 seeds); what export can check on val is only that the per-group acceptance target is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ltserve.errors import ConfigError, unknown_choice
from ltserve.metrics import SHOT_GROUPS, softmax

SCORES: tuple[str, ...] = ("msp", "energy", "max_logit", "ncm_cosine", "mahalanobis")
LOGIT_SCORES: tuple[str, ...] = ("msp", "energy", "max_logit")
FEATURE_SCORES: tuple[str, ...] = ("ncm_cosine", "mahalanobis")
PREFERENCE: tuple[str, ...] = ("mahalanobis", "ncm_cosine", "energy", "max_logit", "msp")
"""The score-choice rule's order (see the module docstring): the benchmark's ranking, best first."""
MODES: tuple[str, ...] = ("off", "flag", "reject")
"""off: no open-set fields; flag: `unknown` and `ood_score` on every answer; reject: an unknown image also answers
label null (class_index, probability, shot_group null; `top_k` kept: the closest known classes)."""
DEFAULT_TARGET = 0.95
MIN_CLASS_IMAGES = 100
"""A class gets its own threshold with at least this many val images predicted into it (else its group's)."""
MIN_GROUP_IMAGES = 20
"""A shot group with fewer predicted val images uses the threshold over all val images."""
OLTR_MSP_THRESHOLD = 0.1
"""OLTR's (Liu et al. CVPR 2019) open-set rule: unknown when the max softmax < 0.1, one global threshold."""
STATS_KEY = "ltserve.open_set_stats"
"""The model.onnx metadata entry (ModelProto.metadata_props; ONNX Runtime's `custom_metadata_map`) holding the
feature statistics: base64 of an .npz with centre, means, whiten."""
FEATURES_OUTPUT = "features"


def check_score(name: str, field: str = "--open-set-score") -> str:
    """`name` if it is a score; else ConfigError listing the choices."""
    if name not in SCORES:
        raise ConfigError(unknown_choice(field, name, SCORES))
    return name


def check_mode(mode: str, field: str = "open_set") -> str:
    if mode not in MODES:
        raise ConfigError(unknown_choice(field, mode, MODES))
    return mode


# -- feature statistics ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """What the feature scores need, fitted on training features.

    Attributes:
        centre: (D,) training mean of the features.
        means: (C, D) class means of z = L2(f - centre) (ncm_cosine uses them normalised).
        whiten: (D, D) L with L L^T = P, the inverse of the pooled within-class covariance of z (+ shrinkage).
    """

    centre: np.ndarray
    means: np.ndarray
    whiten: np.ndarray

    def to_text(self) -> str:
        """base64 of an .npz of the three arrays (float32): the value export writes under STATS_KEY."""
        import base64
        import io

        buf = io.BytesIO()
        np.savez(buf, centre=self.centre, means=self.means, whiten=self.whiten)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> "FeatureStats":
        """Inverse of `to_text`.

        Raises:
            ValueError: not base64 of an .npz holding centre, means and whiten of consistent shapes.
        """
        import base64
        import binascii
        import io
        import zipfile

        try:
            with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as arrays:
                stats = cls(**{k: np.asarray(arrays[k], dtype=np.float32) for k in ("centre", "means", "whiten")})
        except (binascii.Error, KeyError, OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"invalid open-set feature statistics ({type(exc).__name__}: {exc})") from None
        d = stats.centre.shape[0]
        if stats.means.ndim != 2 or stats.means.shape[1] != d or stats.whiten.shape != (d, d):
            raise ValueError(f"open-set feature statistics of inconsistent shapes: centre {stats.centre.shape}, "
                             f"means {stats.means.shape}, whiten {stats.whiten.shape}")
        return stats


def normalise(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """z = (f - centre) / max(||f - centre||, 1e-12), float32 (N, D)."""
    z = np.asarray(features, dtype=np.float32) - centre
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def fit_feature_stats(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      shrinkage: float = 0.01) -> FeatureStats:
    """Class means and pooled covariance of the normalised training features.

    Args:
        features: (N, D) training features; labels: (N,) in 0..C-1, every class present.
        shrinkage: Sigma + shrinkage * trace(Sigma) / D * I before inverting (tail classes hold a few images).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    centre = x.mean(axis=0)
    z = normalise(x, centre.astype(np.float32)).astype(np.float64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"fit_feature_stats: classes {np.flatnonzero(counts == 0).tolist()} have no features")
    means = np.zeros((num_classes, z.shape[1]))
    np.add.at(means, y, z)
    means /= counts[:, None]
    r = z - means[y]
    cov = r.T @ r / len(z)
    d = cov.shape[0]
    cov += (shrinkage * np.trace(cov) / d + 1e-9) * np.eye(d)
    whiten = np.linalg.cholesky(np.linalg.inv(cov))
    return FeatureStats(centre=centre.astype(np.float32), means=means.astype(np.float32),
                        whiten=whiten.astype(np.float32))


# -- scores ------------------------------------------------------------------------------------------------------


class Scorer:
    """One score, ready to run on batch after batch: the feature statistics' products are precomputed so that a batch
    costs a handful of vectorised NumPy calls (the serving path's per-request budget).

    Args:
        name: a score of SCORES.
        stats: the package's `FeatureStats` (feature scores only).

    Raises:
        ConfigError: an unknown score name.
        ValueError: a feature score without stats.
    """

    def __init__(self, name: str, stats: FeatureStats | None = None) -> None:
        self.name = check_score(name, "score")
        self.needs_features = name in FEATURE_SCORES
        if not self.needs_features:
            return
        if stats is None:
            raise ValueError(f"score {name!r} needs the penultimate features and the package's feature statistics")
        self._centre = stats.centre.astype(np.float64)
        means = stats.means.astype(np.float64)
        if name == "ncm_cosine":
            self._k = (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).T  # (D, C)
            return
        # (z - mu_j)^T P (z - mu_j) = z^T P z - 2 z^T P mu_j + mu_j^T P mu_j with P = L L^T, z = u / |u|: one
        # product u @ [P | P mu^T] gives both terms that depend on the image
        whiten = stats.whiten.astype(np.float64)
        precision = whiten @ whiten.T
        cross = precision @ means.T  # P mu^T, (D, C)
        self._d = precision.shape[0]
        self._k = np.concatenate([precision, cross], axis=1)
        self._h = np.einsum("cd,dc->c", means, cross)  # mu_j^T P mu_j

    def __call__(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """The unknown-ness of every row, float64 (N,); see `scores`."""
        if self.name == "msp":
            z = np.asarray(logits, dtype=np.float64)
            return 1.0 - 1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)
        if self.name == "energy":
            z = np.asarray(logits, dtype=np.float64)
            m = z.max(axis=1, keepdims=True)
            return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
        if self.name == "max_logit":
            return -np.asarray(logits, dtype=np.float64).max(axis=1)
        if features is None:
            raise ValueError(f"score {self.name!r} needs the penultimate features (predict_outputs)")
        u = np.asarray(features, dtype=np.float64) - self._centre
        n2 = np.maximum(np.einsum("ij,ij->i", u, u), 1e-24)
        r = u @ self._k
        if self.name == "ncm_cosine":
            return 1.0 - r.max(axis=1) / np.sqrt(n2)
        upu = np.einsum("ij,ij->i", r[:, :self._d], u)
        d2 = (self._h - 2.0 * r[:, self._d:] / np.sqrt(n2)[:, None]).min(axis=1) + upu / n2
        return np.maximum(d2, 0.0)


def scores(name: str, logits: np.ndarray, features: np.ndarray | None = None,
           stats: FeatureStats | None = None) -> np.ndarray:
    """The unknown-ness of every row under score `name`, float64 (N,); higher is less like the training classes.

    Args:
        logits: (N, C) the package's served (calibrated) logits.
        features: (N, D) penultimate features (feature scores only).
        stats: the package's `FeatureStats` (feature scores only).

    Raises:
        ConfigError: an unknown score name.
        ValueError: a feature score without features or stats.
    """
    check_score(name, "score")
    if name in FEATURE_SCORES and (features is None or stats is None):
        raise ValueError(f"score {name!r} needs the penultimate features and the package's feature statistics")
    return Scorer(name, stats)(logits, features)


# -- calibration -------------------------------------------------------------------------------------------------


def _quantile(values: np.ndarray, target: float) -> float:
    # inverted_cdf: the smallest value with at least `target` of the values <= it, so the in-sample acceptance is in
    # [target, target + 1/n)
    return float(np.quantile(values, target, method="inverted_cdf"))


def calibrate(score: np.ndarray, pred: np.ndarray, groups: Sequence[str], target: float = DEFAULT_TARGET,
              min_class_images: int = MIN_CLASS_IMAGES, min_group_images: int = MIN_GROUP_IMAGES) -> dict[str, Any]:
    """Thresholds that accept a `target` share of known (val) images in every shot group of the predicted class.

    Args:
        score: (N,) unknown-ness of known val images; pred: (N,) their predicted classes (the head's argmax).
        groups: C shot groups (the package's).
        target: share of known images to accept, in (0, 1).

    Returns:
        {"thresholds": C floats (accept when score <= thresholds[pred]), "threshold_source": C of "class" |
        "group" | "all", "group_thresholds": {group: float | None}, "global_threshold": float}.
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"open-set target {target}: the share of known images to accept must be in (0, 1)")
    s, p = np.asarray(score, dtype=np.float64), np.asarray(pred, dtype=np.int64)
    g = np.asarray(groups)
    overall = _quantile(s, target)
    group_thr: dict[str, float | None] = {}
    for name in SHOT_GROUPS:
        sel = g[p] == name
        group_thr[name] = _quantile(s[sel], target) if sel.sum() >= min_group_images else (
            overall if (g == name).any() else None)
    thresholds, source = [], []
    for c in range(len(g)):
        sel = p == c
        if sel.sum() >= min_class_images:
            thresholds.append(_quantile(s[sel], target))
            source.append("class")
        else:
            used_group = (g[p] == g[c]).sum() >= min_group_images
            thresholds.append(group_thr[str(g[c])])
            source.append("group" if used_group else "all")
    return {"thresholds": [float(t) for t in thresholds], "threshold_source": source,
            "group_thresholds": group_thr, "global_threshold": overall}


def unknown_mask(score: np.ndarray, pred: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N,) bool: score above the threshold of the predicted class."""
    return np.asarray(score) > np.asarray(thresholds, dtype=np.float64)[np.asarray(pred, dtype=np.int64)]


def acceptance(score: np.ndarray, pred: np.ndarray, groups: Sequence[str], thresholds: Sequence[float],
               by: np.ndarray | None = None) -> dict[str, float | None]:
    """Share of images accepted per shot group of `by` (default: the predicted class), None for an empty group."""
    g = np.asarray(groups)[np.asarray(pred if by is None else by, dtype=np.int64)]
    ok = ~unknown_mask(score, pred, np.asarray(thresholds))
    return {name: (float(ok[g == name].mean()) if (g == name).any() else None) for name in SHOT_GROUPS}


def choose_score(available: Sequence[str], val_scores: dict[str, np.ndarray], pred: np.ndarray,
                 groups: Sequence[str]) -> tuple[str, str]:
    """The score-choice rule (module docstring): the first of PREFERENCE in `available` that val can calibrate.

    Returns:
        (score name, the reason, for model.json).
    """
    g = np.asarray(groups)[np.asarray(pred, dtype=np.int64)]
    skipped = []
    for name in PREFERENCE:
        if name not in available:
            continue
        s = val_scores[name]
        constant = [grp for grp in SHOT_GROUPS if (g == grp).sum() > 1 and np.ptp(s[g == grp]) == 0]
        if not np.isfinite(s).all() or constant:
            skipped.append(f"{name} (not finite or constant within {constant or 'val'})")
            continue
        missing = [x for x in FEATURE_SCORES if x not in available]
        return name, ("rule: the first score of " + " > ".join(PREFERENCE) + " (benchmarks/open_set.py ranking) "
                      "that this graph allows and val can calibrate"
                      + (f"; {', '.join(missing)} need the graph's features output" if missing else "")
                      + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    raise ValueError(f"no open-set score can be calibrated on val (skipped {', '.join(skipped)})")


# -- metrics -----------------------------------------------------------------------------------------------------


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown > score of a known), ties counted half (Mann-Whitney U)."""
    k, u = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    if not len(k) or not len(u):
        return float("nan")
    allv = np.concatenate([u, k])
    srt = np.sort(allv)
    ranks = (np.searchsorted(srt, allv, "left") + np.searchsorted(srt, allv, "right") + 1) / 2.0
    return float((ranks[:len(u)].sum() - len(u) * (len(u) + 1) / 2.0) / (len(u) * len(k)))


def aupr(known: np.ndarray, unknown: np.ndarray) -> float:
    """Average precision with unknown images as positives (ranked by score, highest first)."""
    s = np.concatenate([np.asarray(unknown, np.float64), np.asarray(known, np.float64)])
    y = np.concatenate([np.ones(len(unknown)), np.zeros(len(known))])
    if not len(unknown):
        return float("nan")
    order = np.argsort(-s, kind="stable")
    hit = y[order]
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    return float((precision * hit).sum() / hit.sum())


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Share of unknown images accepted at the threshold that accepts `tpr` of the known images."""
    if not len(known) or not len(unknown):
        return float("nan")
    t = _quantile(np.asarray(known, np.float64), tpr)
    return float(np.mean(np.asarray(unknown) <= t))


def oltr_f_measure(known_pred: np.ndarray, known_labels: np.ndarray, known_rejected: np.ndarray,
                   unknown_rejected: np.ndarray) -> float:
    """OLTR's open-set F-measure: TP known images accepted and right, FP known images accepted and wrong, FN unknown
    images accepted (as some known class); F = 2PR / (P + R). A rejected known image only lowers TP."""
    kr = np.asarray(known_rejected, bool)
    right = np.asarray(known_pred) == np.asarray(known_labels)
    tp = float((~kr & right).sum())
    fp = float((~kr & ~right).sum())
    fn = float((~np.asarray(unknown_rejected, bool)).sum())
    precision = tp / max(tp + fp, 1e-12)
    recall = tp / max(tp + fn, 1e-12)
    return float(2 * precision * recall / max(precision + recall, 1e-12))


def open_set_report(known_score: np.ndarray, known_pred: np.ndarray, known_labels: np.ndarray,
                    unknown_score: np.ndarray, unknown_pred: np.ndarray, groups: Sequence[str],
                    thresholds: Sequence[float]) -> dict[str, Any]:
    """Threshold-free separation (AUROC, AUPR with unknown positive, FPR at 95 % TPR) and the operating point's
    numbers: known images rejected per shot group (of the true class), accuracy on accepted known images and on all
    of them per group (mean of per-class accuracies, like the classification report), unknown images rejected,
    and OLTR's F-measure."""
    thr = np.asarray(thresholds, dtype=np.float64)
    k_rej = unknown_mask(known_score, known_pred, thr)
    u_rej = unknown_mask(unknown_score, unknown_pred, thr)
    labels = np.asarray(known_labels, dtype=np.int64)
    g = np.asarray(groups)
    right = np.asarray(known_pred) == labels
    rejected, acc_acc, acc_all = {}, {}, {}
    for name in SHOT_GROUPS:
        classes = np.flatnonzero(g == name)
        sel = np.isin(labels, classes)
        rejected[name] = float(k_rej[sel].mean()) if sel.any() else None
        acc_all[name] = _mean_class_acc(right, labels, classes, np.ones_like(right))
        acc_acc[name] = _mean_class_acc(right, labels, classes, ~k_rej)
    return {
        "n_known": int(len(labels)), "n_unknown": int(len(unknown_score)),
        "auroc": auroc(known_score, unknown_score), "aupr": aupr(known_score, unknown_score),
        "fpr_at_95_tpr": fpr_at_tpr(known_score, unknown_score),
        "known_rejected": {**rejected, "all": float(k_rej.mean()) if len(k_rej) else None},
        "unknown_rejected": float(u_rej.mean()) if len(u_rej) else None,
        "accuracy_accepted": {**acc_acc, "all": float(right[~k_rej].mean()) if (~k_rej).any() else None},
        "accuracy_all": {**acc_all, "all": float(right.mean()) if len(right) else None},
        "f_measure": oltr_f_measure(known_pred, labels, k_rej, u_rej),
    }


def _mean_class_acc(right: np.ndarray, labels: np.ndarray, classes: np.ndarray, keep: np.ndarray) -> float | None:
    accs = [float(right[(labels == c) & keep].mean()) for c in classes if ((labels == c) & keep).any()]
    return float(np.mean(accs)) if accs else None
