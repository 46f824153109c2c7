"""Open-set rejection: scores, their per-shot-group calibration, the score-choice rule, and open-set metrics
(NumPy only; export calibrates with it, the runtime applies it, evaluation and the benchmark measure it).

Every score is an *unknown-ness*: higher means less like the training classes, and an image is unknown when its
score exceeds the threshold of its predicted class (`thresholds[argmax logits]`).

    msp          1 - max softmax(logits)            the served logits already carry the head's temperature
    energy       -logsumexp(logits)                 Liu et al. 2020 (T folded into the logits)
    max_logit    -max logits                        Hendrycks et al. 2022
    ncm_cosine   1 - max_j cos(z, m_j)              z = L2(f - mu); m_j: unit class means of z on train
    mahalanobis  min_j (z - mu_j)^T P (z - mu_j)     same z; class means of z, P the inverse pooled covariance
    mahalanobis_raw  min_j (f - m_j)^T Q (f - m_j)  f itself; m_j class means of f, Q the inverse pooled covariance of f

f are the penultimate features (the package graph's `features` output), mu their training mean. The feature scores
need the features output and the `FeatureStats` export stores in model.onnx's metadata (`STATS_KEY`: the package
stays one graph file, and its sha256 covers them); older packages have logit scores only, and packages exported
before mahalanobis_raw have no raw statistics (`FeatureStats.scores()` says which feature scores a package allows).
Why both Mahalanobis variants: L2 normalisation drops the feature norm, and on Fashion-MNIST-LT the held-out Sneaker
images have *larger* feature norms than known test images (they fire the shoe features of Sandal and Ankle boot
harder): on the normalised features they sit closer to the class means than known images do (AUROC 0.09 for
Sneaker), on the raw ones the norm counts as distance (`benchmarks/open_set.py`).

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
from ltserve.metrics import SHOT_GROUPS

SCORES: tuple[str, ...] = ("msp", "energy", "max_logit", "ncm_cosine", "mahalanobis", "mahalanobis_raw")
LOGIT_SCORES: tuple[str, ...] = ("msp", "energy", "max_logit")
FEATURE_SCORES: tuple[str, ...] = ("ncm_cosine", "mahalanobis", "mahalanobis_raw")
PREFERENCE: tuple[str, ...] = ("mahalanobis", "mahalanobis_raw", "ncm_cosine", "energy", "max_logit", "msp")
"""The score-choice rule's order (see the module docstring), best first, from `benchmarks/open_set.py`
(Fashion-MNIST-LT, Shirt and Sneaker held out, every head, 3 seeds), ranked by the issue's goals: first the bound on
known images rejected in every shot group, then AUROC. The feature scores lead on far unknowns (AUROC 0.94-0.95
against 0.55-0.73 for the logit scores of the re-balanced heads). mahalanobis_raw is the only score not below chance
on the near ones (0.57 against 0.42 for mahalanobis), and far it ties (0.946 vs 0.950), but its per-group thresholds
reject 7.5-9 % of few-shot known test images with every head (mahalanobis: 5.3-7.5 %), so it ranks second; choose it
with `--open-set-score mahalanobis_raw` where near unknowns matter more than the tail. No score separates the near
unknowns well: see docs/open-set.md."""
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
        raw_means: (C, D) class means of the features f themselves (mahalanobis_raw); None in packages exported
            before it.
        raw_whiten: (D, D) L with L L^T = Q, the inverse pooled within-class covariance of f (+ shrinkage); None
            with raw_means.
    """

    centre: np.ndarray
    means: np.ndarray
    whiten: np.ndarray
    raw_means: np.ndarray | None = None
    raw_whiten: np.ndarray | None = None

    def scores(self) -> tuple[str, ...]:
        """The feature scores these statistics allow (no mahalanobis_raw without the raw ones)."""
        return tuple(s for s in FEATURE_SCORES if s != "mahalanobis_raw" or self.raw_means is not None)

    def to_text(self) -> str:
        """base64 of an .npz of the arrays (float32): the value export writes under STATS_KEY."""
        import base64
        import io

        buf = io.BytesIO()
        arrays = {k: getattr(self, k) for k in _STATS_ARRAYS if getattr(self, k) is not None}
        np.savez(buf, **arrays)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> "FeatureStats":
        """Inverse of `to_text`; raw_means and raw_whiten may be absent (packages exported before them).

        Raises:
            ValueError: not base64 of an .npz holding centre, means and whiten (and both or neither of raw_means,
                raw_whiten) of consistent shapes.
        """
        import base64
        import binascii
        import io
        import zipfile

        try:
            with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as arrays:
                got = {k: np.asarray(arrays[k], dtype=np.float32) for k in _STATS_ARRAYS if k in arrays.files}
            stats = cls(**got)
        except (binascii.Error, KeyError, OSError, TypeError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"invalid open-set feature statistics ({type(exc).__name__}: {exc})") from None
        d, c = stats.centre.shape[0], stats.means.shape[0]
        bad = stats.means.ndim != 2 or stats.means.shape[1] != d or stats.whiten.shape != (d, d)
        if (stats.raw_means is None) != (stats.raw_whiten is None):
            bad = True
        elif stats.raw_means is not None:
            bad = bad or stats.raw_means.shape != (c, d) or stats.raw_whiten.shape != (d, d)
        if bad:
            shapes = {k: None if getattr(stats, k) is None else getattr(stats, k).shape for k in _STATS_ARRAYS}
            raise ValueError(f"open-set feature statistics of inconsistent shapes: {shapes}")
        return stats


_STATS_ARRAYS = ("centre", "means", "whiten", "raw_means", "raw_whiten")


def normalise(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """z = (f - centre) / max(||f - centre||, 1e-12), float32 (N, D)."""
    z = np.asarray(features, dtype=np.float32) - centre
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def _class_gaussians(x: np.ndarray, y: np.ndarray, counts: np.ndarray,
                     shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Class means (C, D) of x (N, D) and L (D, D) with L L^T the inverse of the pooled within-class covariance,
    shrunk by shrinkage * trace / D * I (tail classes hold a few images)."""
    means = np.zeros((len(counts), x.shape[1]))
    np.add.at(means, y, x)
    means /= counts[:, None]
    r = x - means[y]
    cov = r.T @ r / len(x)
    d = cov.shape[0]
    cov += (shrinkage * np.trace(cov) / d + 1e-9) * np.eye(d)
    return means, np.linalg.cholesky(np.linalg.inv(cov))


def fit_feature_stats(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      shrinkage: float = 0.01) -> FeatureStats:
    """Class means and pooled covariance of the normalised training features, and of the raw ones.

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
    means, whiten = _class_gaussians(z, y, counts, shrinkage)
    raw_means, raw_whiten = _class_gaussians(x, y, counts, shrinkage)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    return FeatureStats(centre=f32(centre), means=f32(means), whiten=f32(whiten), raw_means=f32(raw_means),
                        raw_whiten=f32(raw_whiten))


# -- scores ------------------------------------------------------------------------------------------------------


class Scorer:
    """One score, ready to run on batch after batch. Everything that does not depend on the image is precomputed
    here, and a call is a handful of vectorised NumPy calls (float64) chosen once: at batch 1 NumPy's per-call
    overhead (about a microsecond) is the cost, so the formulas below are arranged for the fewest calls.

    Args:
        name: a score of SCORES.
        stats: the package's `FeatureStats` (feature scores only).

    Raises:
        ConfigError: an unknown score name.
        ValueError: a feature score without stats, or mahalanobis_raw with stats that lack the raw ones.
    """

    def __init__(self, name: str, stats: FeatureStats | None = None) -> None:
        self.name = check_score(name, "score")
        self.needs_features = name in FEATURE_SCORES
        self._fn = getattr(self, "_" + name)
        if not self.needs_features:
            return
        if stats is None:
            raise ValueError(f"score {name!r} needs the penultimate features and the package's feature statistics")
        if name not in stats.scores():
            raise ValueError(f"score {name!r} needs raw feature statistics, which packages exported before it lack; "
                             "re-export the package")
        self._centre = stats.centre.astype(np.float64)
        if name == "ncm_cosine":
            means = stats.means.astype(np.float64)
            self._k = (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).T  # (D, C)
            return
        raw = name == "mahalanobis_raw"
        means = (stats.raw_means if raw else stats.means).astype(np.float64)
        whiten = (stats.raw_whiten if raw else stats.whiten).astype(np.float64)
        # (x - mu_j)^T P (x - mu_j) = x^T P x - 2 x^T P mu_j + mu_j^T P mu_j with P = L L^T: one product
        # x @ [P | 2 P mu^T] gives both terms that depend on the image; min_j is then one max over j
        precision = whiten @ whiten.T
        cross = precision @ means.T  # P mu^T, (D, C)
        self._d = precision.shape[0]
        self._k = np.ascontiguousarray(np.concatenate([precision, 2.0 * cross], axis=1))
        self._h = np.einsum("cd,dc->c", means, cross)  # mu_j^T P mu_j, (C,)

    def __call__(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """The unknown-ness of every row, float64 (N,); see `scores`."""
        if features is not None:
            features = np.asarray(features)
        elif self.needs_features:
            raise ValueError(f"score {self.name!r} needs the penultimate features (predict_outputs)")
        return self._fn(np.asarray(logits), features)

    # the scores, each equal (to float64 rounding) to its formula in the module docstring; tests compare them

    @staticmethod
    def _msp(logits: np.ndarray, _: Any) -> np.ndarray:
        # 1 - max softmax = 1 - exp(max - logsumexp); expm1 keeps the digits of a confident row
        lse = np.logaddexp.reduce(logits, axis=1, dtype=np.float64)
        return -np.expm1(logits.max(axis=1) - lse)

    @staticmethod
    def _energy(logits: np.ndarray, _: Any) -> np.ndarray:
        return -np.logaddexp.reduce(logits, axis=1, dtype=np.float64)

    @staticmethod
    def _max_logit(logits: np.ndarray, _: Any) -> np.ndarray:
        return np.negative(logits.max(axis=1), dtype=np.float64)

    def _ncm_cosine(self, _: Any, features: np.ndarray) -> np.ndarray:
        u = np.subtract(features, self._centre)  # float64
        return 1.0 - (u @ self._k).max(axis=1) / np.sqrt(np.maximum(_row_dot(u, u), 1e-24))

    def _mahalanobis(self, _: Any, features: np.ndarray) -> np.ndarray:
        # z = u / |u|: z^T P z = u^T P u / |u|^2 and z^T P mu_j = u^T P mu_j / |u|, so u is never divided
        u = np.subtract(features, self._centre)
        n2 = np.maximum(_row_dot(u, u), 1e-24)
        r = u @ self._k
        best = (r[:, self._d:] * (n2 ** -0.5)[:, None] - self._h).max(axis=1)
        return np.maximum(_row_dot(r[:, :self._d], u) / n2 - best, 0.0)

    def _mahalanobis_raw(self, _: Any, features: np.ndarray) -> np.ndarray:
        f = features.astype(np.float64)
        r = f @ self._k
        best = np.subtract(r[:, self._d:], self._h).max(axis=1)
        return np.maximum(_row_dot(r[:, :self._d], f) - best, 0.0)


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) row-wise dot products of two (N, D) float64 arrays: one batched matmul (about half of einsum's call cost
    at batch 1)."""
    return np.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


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
