"""Open-set rejection at export: the graph's features output checked, the feature statistics, the score chosen and
its thresholds calibrated per shot group on the run's val split (`ltserve.open_set` holds the arithmetic).

The val logits are the head's own calibrated logits on the cached val features (export verifies the folded graph
against these very logits), and the features are the cached ones (the graph's `features` output is checked against
the backbone here), so the thresholds are those of the served graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ltserve.errors import ConfigError, PackageError
from ltserve.export.graph import INPUT_NAME
from ltserve.features.cache import cached_features
from ltserve.heads import CalibratedHead
from ltserve.metrics import shot_groups
from ltserve.open_set import (DEFAULT_TARGET, FEATURE_SCORES, LOGIT_SCORES, STATS_KEY, FeatureStats, acceptance,
                              calibrate, check_score, choose_score, fit_feature_stats, scores)
from ltserve.package import OpenSetInfo
from ltserve.rundir import Run

log = logging.getLogger(__name__)

FEATURES_RTOL = 1e-4
"""max |ONNX features - torch features| <= FEATURES_RTOL * max(1, max |features|)."""


def verify_features(path: Path, name: str, x: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """The graph's features output against the backbone's features (torch, eval mode) on the verification images.

    Raises:
        PackageError: they differ by more than the tolerance.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run([name], {INPUT_NAME: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    ref = np.asarray(ref, dtype=np.float64)
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    tol = FEATURES_RTOL * max(1.0, float(np.abs(ref).max()))
    if got.shape != ref.shape or not diff <= tol:
        raise PackageError(f"{path.name}: the {name!r} output differs from the backbone's features "
                           f"(shape {got.shape} vs {ref.shape}, max |diff| {diff:.3g} > {tol:.3g})")
    return {"output": name, "images": int(len(x)), "max_abs_diff": diff, "tolerance": tol}


def check_override(score: str | None, has_features: bool) -> None:
    """Fail early on a bad --open-set-score (before the slow steps)."""
    if score is None:
        return
    check_score(score)
    if score in FEATURE_SCORES and not has_features:
        raise ConfigError(f"--open-set-score {score}: a feature score needs the graph's features output; choose one "
                          f"of {', '.join(LOGIT_SCORES)}")


def embed_stats(path: Path, stats: FeatureStats) -> None:
    """Write the feature statistics into the graph file's metadata (`STATS_KEY`), replacing an older entry: the
    package stays one graph file, and model.json's sha256 of it covers them. No node changes."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != STATS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = STATS_KEY, stats.to_text()
    onnx.save(model, str(path))


def open_set_info(run: Run, head: CalibratedHead, features_name: str | None, score: str | None = None,
                  target: float = DEFAULT_TARGET) -> tuple[OpenSetInfo | None, FeatureStats | None]:
    """Choose the score (the rule of `ltserve.open_set.choose_score`, or `score`) and calibrate it per shot group on
    val; with a features output, fit the feature statistics on the cached training features.

    Returns:
        (the model.json section, the statistics to `embed_stats`, or None without features); (None, None) when the
        run has no val split (nothing to calibrate on).
    """
    if not run.info.split_sizes.get("val"):
        log.warning("%s: no val split: the package gets no open-set thresholds", run.root)
        return None, None
    info = run.info
    groups = shot_groups(info.class_counts, info.many_threshold, info.few_threshold)
    xv, yv = cached_features(run, "val", progress=False)
    yv = np.asarray(yv, dtype=np.int64)
    logits = head.logits(xv)
    pred = logits.argmax(axis=1)
    stats = None
    available = list(LOGIT_SCORES)
    if features_name is not None:
        xt, yt = cached_features(run, "train", progress=False)
        stats = fit_feature_stats(xt, np.asarray(yt, dtype=np.int64), head.num_classes)
        available += list(stats.scores())
    val_scores = {name: scores(name, logits, xv, stats) for name in available}
    if score is None:
        score, why = choose_score(available, val_scores, pred, groups)
    else:
        why = f"--open-set-score {score} (override of the export rule)"
    candidates = {}
    for name in available:
        cal = calibrate(val_scores[name], pred, groups, target)
        glob = [cal["global_threshold"]] * len(groups)
        candidates[name] = {
            "accepted_by_true_group": acceptance(val_scores[name], pred, groups, cal["thresholds"], by=yv),
            "accepted_by_true_group_one_threshold": acceptance(val_scores[name], pred, groups, glob, by=yv)}
    cal = calibrate(val_scores[score], pred, groups, target)
    accepted = {"by_predicted_group": acceptance(val_scores[score], pred, groups, cal["thresholds"]),
                "by_true_group": acceptance(val_scores[score], pred, groups, cal["thresholds"], by=yv)}
    log.info("open set: score %s (%s), val acceptance by true group %s", score, why, accepted["by_true_group"])
    return OpenSetInfo(score=score, chosen_by=why, target=target, thresholds=cal["thresholds"],
                       threshold_source=cal["threshold_source"], group_thresholds=cal["group_thresholds"],
                       split="val", n=int(len(yv)), val_accepted=accepted, candidates=candidates,
                       stats_key=STATS_KEY if stats is not None else None), stats
