"""What model.json says about the head: its parameters (the registry's `params`), its val and test metrics, and
what label-shift estimation needs (the val confusion matrix and class-wise bias); `describe` writes it."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ltserve.config import config_hash
from ltserve.evaluate.run import head_report
from ltserve.evaluate.selection import recorded_metrics
from ltserve.features.cache import cached_features
from ltserve.heads import HEADS, CalibratedHead, head_sha256
from ltserve.heads.calibrate import BIAS_ALPHA, fit_class_bias
from ltserve.heads.head import served_prior
from ltserve.package import (HeadInfo, LabelShiftInfo, ModelJson, OpenSetInfo, ShotThresholds, graph_info,
                             write_package)
from ltserve.preprocess import PreprocessSpec
from ltserve.rundir import Run

log = logging.getLogger(__name__)


def head_params(head: CalibratedHead) -> dict[str, Any]:
    """The parameters that define a head, for model.json: what every head has (method, feature transform, target
    prior, calibration) and its method's own, from its registry entry (`HeadMethod.params`: tau, scales, ...)."""
    params: dict[str, Any] = {"method": head.method, "feature_transform": head.feature_transform,
                              **HEADS.get(head.method).params(head)}
    params["target_prior"] = head.meta.get("target_prior", {"kind": "uniform"})
    if "calibration" in head.meta:
        params["calibration"] = head.meta["calibration"]
    return params


def head_metrics(run: Run, head: CalibratedHead) -> dict[str, Any]:
    """The head's val and test numbers for model.json, whatever ran before export.

    For each split the run has: val from the head's meta["val"] (stage 2 writes it with the head); else the head's
    entry in `eval/<split>.json` when it was computed on these very head files (its `head_sha256`: not re-fitted
    since); else computed here from the run's cached features (`ltserve.evaluate.run.head_report`, the numbers
    `ltserve evaluate` would write). So `train -> rebalance -> export` records test metrics without an evaluation in
    between, and a stale evaluation is never copied.

    Returns:
        {"val": report, "test": report} (a split with nothing recorded and no images in the run is left out); each
        report is a classification report (top1, top5, many, medium, few, balanced_accuracy, ece_raw, ece,
        per_class, n, ...) plus "source": where it came from.
    """
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        metrics = _split_metrics(run, head, split)
        if metrics is not None:
            out[split] = metrics
    return out


def _split_metrics(run: Run, head: CalibratedHead, split: str) -> dict[str, Any] | None:
    name = head.method
    meta_val = head.meta.get("val")
    if split == "val" and isinstance(meta_val, dict):
        return {**meta_val, "source": f"heads/{name}.json"}
    recorded = recorded_metrics(run, split, name)
    if recorded is not None and recorded.get("head_sha256") == head_sha256(run.paths.heads, name):
        return {**recorded, "source": f"eval/{split}.json"}
    if not run.info.split_sizes.get(split):
        return None  # the run has no such split: nothing to compute on
    if recorded is not None:
        log.info("%s: the %s entry was not computed on the current heads/%s.* (re-fitted since, or written by an "
                 "older ltserve); computing the %s metrics from the cached features", run.paths.eval / f"{split}.json",
                 name, name, split)
    x, y = cached_features(run, split)  # type: ignore[arg-type]
    return {**head_report(run, name, x, y), "source": f"computed at export from the cached {split} features"}


def label_shift_info(run: Run, head: CalibratedHead) -> LabelShiftInfo | None:
    """What label-shift estimation needs, measured on the run's val split: the head's confusion matrix (BBSE) and
    its class-wise bias (EM; `ltserve.heads.calibrate.fit_class_bias`, kept only when significant). None when the
    run has no val split.

    Computed from the cached val features with the head's own calibrated logits, whose argmax is the package's
    (export verifies the folded graph against them).
    """
    if not run.info.split_sizes.get("val"):
        return None
    x, y = cached_features(run, "val", progress=False)
    y = np.asarray(y, dtype=np.int64)
    c = head.num_classes
    logits = head.logits(x).astype(np.float64)
    counts = np.bincount(y * c + logits.argmax(axis=1), minlength=c * c).reshape(c, c)
    # the offset that would calibrate a head that is right about its own prior for the split's class mix
    weights = head_params(head)["target_prior"].get("weights")
    freq = np.maximum(np.bincount(y, minlength=c) / max(len(y), 1), 1e-12)
    offset = np.log(freq) - np.log(served_prior(weights, head.temperature, c))
    fit = fit_class_bias(logits, y, offset)
    log.info("%s: class-wise bias on val: LR statistic %.1f (dof %d, p %.3g): %s", head.method, fit.statistic,
             fit.dof, fit.p_value, f"recorded, shrunk by {fit.shrinkage:.2f}" if fit.applied else "none recorded")
    return LabelShiftInfo(split="val", n=int(len(y)), confusion=counts.astype(int).tolist(),
                          bias=[round(float(b), 6) for b in fit.bias],
                          bias_test={"statistic": fit.statistic, "dof": fit.dof, "p_value": fit.p_value,
                                     "alpha": BIAS_ALPHA, "shrinkage": fit.shrinkage, "applied": fit.applied,
                                     "fitted": [round(float(b), 6) for b in fit.fitted]})


def describe(run: Run, out_dir: Path, tmp: Path, head: CalibratedHead, spec: PreprocessSpec,
              verification: dict[str, Any], precision: str, command: str | None, files: list[str],
              features_name: str | None = None, open_set: OpenSetInfo | None = None) -> ModelJson:
    """Write model.json for the files in `tmp` (through the one writer, which reads it back and verifies it)."""
    import onnx

    info = run.info
    return write_package(
        tmp, name=out_dir.name, labels=info.class_names, class_counts=info.class_counts,
        thresholds=ShotThresholds(many=info.many_threshold, few=info.few_threshold), preprocess=spec,
        head=HeadInfo(name=head.method, params=head_params(head), temperature=head.temperature),
        metrics=head_metrics(run, head), verification=verification,
        graph=graph_info(onnx.load(str(tmp / "model.onnx")), precision), files=files,
        label_shift=label_shift_info(run, head), features_name=features_name, open_set=open_set,
        command=command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        run=str(run.root), config_hash=config_hash(run.config))
