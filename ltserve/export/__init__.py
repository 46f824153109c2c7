"""Fold a head into one Gemm and export a verified model package: `model.onnx` (+ `model.pt2`) and `model.json`.

    export_package(run, head, out_dir, precision="fp32" | "fp16" | "int8", jpeg_draft="auto" | "on" | "off")
        (`ltserve export runs/NAME --head HEAD --out models/NAME [--precision int8] [--jpeg-draft auto]`)

    fold.py       the exported module: backbone -> (ncm: centring + L2) -> one Gemm holding (W / T, b / T)
    graph.py      torch.export -> ONNX (symbolic batch), the head sub-graph check, fp16 conversion
    quantize.py   int8: class-balanced calibration on training images, static QDQ quantisation, the int8 head
                  check, sensitivity ranking and retries
    reference.py  verification images (the run's test split) and the unfolded head's logits (the registry)
    verify.py     ONNX Runtime vs unfolded (fp32), fp16 / int8 vs fp32 per shot group (one comparison), pt2 vs ONNX,
                  lws scales
    open_set.py   open-set rejection: the graph's `features` output checked, feature statistics (into model.onnx's metadata), the
                  score chosen and its thresholds calibrated per shot group on val (`ltserve.open_set`)
    draft.py      JPEG draft decoding: the shipped graph on the verification split decoded exactly and with draft,
                  per shot group (the same comparison); on, off or refused, and why

Every folded head therefore has exactly the node count of the joint export; ncm adds its four normalisation nodes
(Sub, ReduceL2, Clip, Div). The penultimate features (the tensor the head reads) are a second graph output,
`features`, which adds no node; their class statistics go into model.onnx's metadata and the calibrated open-set
score and thresholds into model.json's `open_set` section. Verification is part of export and a package that fails it is never written (it is
built in a temporary folder beside the target and moved into place at the end). `model.json` records the head's
parameters, its val and test metrics (test computed from the cached features when no evaluation recorded it), the
verification (with `warnings`, e.g. tiny lws scales; non-positive ones refuse the export), provenance, and the head's
val confusion matrix (`label_shift`: what black-box label-shift estimation needs, `ltserve.runtime.prior`).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ltserve.config import config_hash
from ltserve.errors import ConfigError, PackageError, RunError, unknown_choice
from ltserve.evaluate.run import head_report
from ltserve.evaluate.selection import recorded_metrics
from ltserve.export.draft import JPEG_DRAFT_MODES, JpegDraftOptions, check_jpeg_draft
from ltserve.export.fold import FoldedClassifier
from ltserve.export.graph import (MIN_OPSET, add_features_output, check_model, expose_output, export_onnx,
                                  remove_output, to_fp16)
from ltserve.export.open_set import check_override, embed_stats, open_set_info, verify_features
from ltserve.export.reference import backbone_features, unfolded_logits, verification_images
from ltserve.export.quantize import DEFAULT_KEEP_FLOAT, Int8Inputs, Int8Options, build_int8
from ltserve.export.verify import (VERIFY_IMAGES, check_scales, per_row_constant, verify_fp16, verify_onnx,
                                  write_pt2)
from ltserve.features.backbones import load_run_backbone
from ltserve.features.cache import cached_features
from ltserve.heads import HEADS, CalibratedHead, head_sha256
from ltserve.heads.calibrate import BIAS_ALPHA, fit_class_bias
from ltserve.heads.head import served_prior
from ltserve.open_set import DEFAULT_TARGET
from ltserve.package import (MODEL_JSON, HeadInfo, LabelShiftInfo, ModelJson, OpenSetInfo, ShotThresholds, graph_info,
                             write_package)
from ltserve.preprocess import PreprocessSpec
from ltserve.progress import progress_bar
from ltserve.rundir import Run, open_run

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
PRECISIONS = ("fp32", "fp16", "int8")
INT8_VERIFY_IMAGES = 2000
"""int8's default verification sample: its bounds are a point or less per shot group, and with 256 images a few-shot
group of two classes holds ~50 images, where one flipped image moves its accuracy by 2 points."""

__all__ = ["DEFAULT_KEEP_FLOAT", "FORMATS", "INT8_VERIFY_IMAGES", "Int8Options", "JPEG_DRAFT_MODES", "JpegDraftOptions",
           "PRECISIONS", "VERIFY_IMAGES", "export_package", "head_params", "parse_formats"]


def head_params(head: CalibratedHead) -> dict[str, Any]:
    """The parameters that define a head, for model.json (sweep curves and per-epoch logs left out)."""
    params: dict[str, Any] = {"method": head.method, "feature_transform": head.feature_transform}
    for meta in (head.meta.get("base_meta") or {}, head.meta):
        for key in ("tau", "keep_bias", "tau_source", "tau_la", "tau_la_source", "metric", "base", "best_epoch",
                    "selection_metric", "target_prior"):
            if key in meta:
                params[key] = meta[key]
    params.setdefault("target_prior", {"kind": "uniform"})
    if "scales" in head.extras:
        f = head.extras["scales"].astype(np.float64)
        params["scales"] = {"min": float(f.min()), "mean": float(f.mean()), "max": float(f.max())}
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


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """"onnx,pt2" or ("onnx", "pt2") -> validated tuple; onnx is always written (the package's serving format)."""
    items = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    for f in items:
        if f not in FORMATS:
            raise ConfigError(unknown_choice("--model-format", f, FORMATS))
    if "onnx" not in items:
        raise ConfigError(f"--model-format {','.join(items)}: a model package always holds model.onnx; use onnx or "
                          "onnx,pt2")
    return tuple(dict.fromkeys(items))


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MODEL_JSON).is_file())):
        raise PackageError(f"{out_dir}: exists and is not a model package; choose another --out or remove it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` (absent, empty or an older package) by the verified `tmp` folder."""
    _check_target(out_dir)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.replace(old / "package")
    tmp.replace(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_package(run: Run | str | Path, head: str, out_dir: str | Path, precision: str = "fp32",
                   opset: int | None = None, formats: str | Sequence[str] = ("onnx",), *,
                   verify_images: int | None = None, int8: Int8Options | None = None,
                   jpeg_draft: str | JpegDraftOptions = "auto", command: str | None = None,
                   progress: bool = True, open_set_score: str | None = None,
                   open_set_target: float = DEFAULT_TARGET) -> ModelJson:
    """Fold `head` of a run, export it and write a verified model package to `out_dir`.

    Args:
        run: a run (a `Run`, or its directory) with backbone.safetensors, run.json and heads/<head>.* (and joint).
        head: a registered head name (`ltserve.heads.HEADS`).
        out_dir: the package folder (created; an older package there is replaced once the new one is verified).
        precision: "fp32"; "fp16" (float16 weights); or "int8" (static QDQ quantisation calibrated on a
            class-balanced sample of training images, refused when few-shot or All accuracy drops past
            `int8`'s bounds). Input and output stay float32 in every case.
        opset: ONNX opset (>= 18); None uses the exporter's default.
        formats: "onnx" or "onnx,pt2" (pt2: also a torch.export program, `model.pt2`, always fp32).
        verify_images: how many test-split images the checks run on (stratified, every class represented);
            None: VERIFY_IMAGES (256), INT8_VERIFY_IMAGES (2000) for int8.
        int8: calibration, bounds and retries of int8 (None: `Int8Options()`); ignored for other precisions.
        jpeg_draft: whether the package allows JPEG draft decoding (`ltserve.export.draft`): "auto" (on when the
            shipped graph keeps every group's accuracy within 0.3 point on the verification split decoded with
            draft, else off), "on" (the same check; refuse the export when it fails), "off" (no check); or a
            `JpegDraftOptions` with the bound and sample size. The run config's `preprocess.allow_draft` is not
            used: this decides it, and model.json records why (`verification["jpeg_draft"]`).
        command: the command line recorded in provenance (default: this process's argv).
        open_set_score: the open-set score (`ltserve.open_set.SCORES`); None: chosen by the rule of
            `ltserve.open_set.choose_score`. Calibrated per shot group on val (`open_set_target` of the known val
            images accepted in every group) into model.json's `open_set`.
        progress: show a progress bar over the steps (on a terminal).

    Returns:
        the written ModelJson.

    Raises:
        ConfigError: unknown head, format or precision, unsupported opset.
        RunError: the run or the head is missing or inconsistent (or, for int8, its data set is not on disk).
        PackageError: a check failed (nothing is written; for int8 and `jpeg_draft="on"` the message holds the
            per-group table), or out_dir is something other than a model package.
    """
    t_start = time.perf_counter()
    run, out_dir = open_run(run), Path(out_dir)
    if head not in HEADS:
        raise ConfigError(unknown_choice("--head", head, HEADS.names()))
    formats = parse_formats(formats)
    if precision not in PRECISIONS:
        raise ConfigError(unknown_choice("--precision", precision, PRECISIONS))
    check_override(open_set_score, has_features=True)
    if not 0.0 < open_set_target < 1.0:
        raise ConfigError(f"--open-set-target {open_set_target}: the share of known images to accept must be in "
                          "(0, 1), e.g. 0.95")
    draft = jpeg_draft if isinstance(jpeg_draft, JpegDraftOptions) else JpegDraftOptions(mode=jpeg_draft)
    if verify_images is None:
        verify_images = INT8_VERIFY_IMAGES if precision == "int8" else VERIFY_IMAGES
    if opset is not None and opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: the exporter writes opset {MIN_OPSET} or newer; choose >= {MIN_OPSET}")
    _check_target(out_dir)
    steps = ["load", "export", "verify", *([precision] if precision != "fp32" else []),
             *(["jpeg draft"] if draft.mode != "off" else []), *(["pt2"] if "pt2" in formats else []), "write"]
    bar = progress_bar(total=len(steps), desc=f"export {head}", unit="step", enabled=progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = _build(run, head, out_dir, tmp, precision, opset, formats, verify_images, int8 or Int8Options(),
                      draft, command, bar, t_start, (open_set_score, open_set_target))
        _move_into_place(tmp, out_dir)
    except PackageError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackageError(f"export of head {head!r} from {run.root} failed, nothing written to {out_dir}: {exc}") \
            from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    log.info("exported %s of %s to %s in %.1f s (%d nodes, %s, max |diff| %.2g)", head, run.root, out_dir,
             time.perf_counter() - t_start, meta.graph.nodes, meta.graph.precision,
             meta.verification["fp32"]["max_abs_diff"])
    return meta


def _load(run: Run, head_name: str) -> tuple[CalibratedHead, CalibratedHead, nn.Module]:
    """(head, joint head, backbone) of the run, checked against each other."""
    backbone = load_run_backbone(run)
    info = run.info
    if not info.finished:
        log.warning("%s: stage 1 has not finished (%d epochs done); exporting its latest backbone",
                    run.paths.run_json, info.epochs_done)
    head, joint = run.head(head_name), run.head("joint")
    c, d = len(info.class_names), int(backbone.num_features)
    for h in {head.method: head, "joint": joint}.values():
        if h.weight.shape != (c, d):
            raise RunError(f"{run.paths.heads / (h.method + '.safetensors')}: weight is {h.weight.shape}, but the run "
                           f"has {c} classes and {d}-d features; re-fit the head")
    if head.method != head_name:
        raise RunError(f"{run.paths.heads / (head_name + '.json')}: holds method {head.method!r}, not {head_name!r}")
    return head, joint, backbone


def _build(run: Run, head_name: str, out_dir: Path, tmp: Path, precision: str, opset: int | None,
           formats: tuple[str, ...], n_images: int, int8: Int8Options, draft: JpegDraftOptions,
           command: str | None, bar: Any, t_start: float,
           open_set: tuple[str | None, float] = (None, DEFAULT_TARGET)) -> ModelJson:
    """Export, verify and describe into `tmp`; raise on the first failed check."""
    head, joint, backbone = _load(run, head_name)
    info, cfg = run.info, run.config
    warnings = check_scales(head, info.class_names)  # before the slow steps: non-positive scales refuse the export
    for message in warnings:
        log.warning("%s: head %s: %s", run.root, head_name, message)
    x, labels, split, fingerprint = verification_images(cfg.data.model_dump_json(), cfg.preprocess.model_dump_json(),
                                                        n_images)
    if fingerprint != info.data_fingerprint:
        log.warning("data fingerprint %s differs from the run's %s: verifying on the data set as it is now",
                    fingerprint, info.data_fingerprint)
    feats = backbone_features(backbone, x)
    ref = unfolded_logits(head, joint, feats, info.class_counts)
    verification: dict[str, Any] = {"inputs": {"split": split, "images": int(len(x)), "data_fingerprint": fingerprint},
                                    "warnings": warnings}
    bar.update()

    t0 = time.perf_counter()
    fp32_path = tmp / ("model.fp32.onnx" if precision != "fp32" else "model.onnx")
    program = export_onnx(FoldedClassifier(backbone, head).eval(), x, fp32_path, opset)
    features_name = add_features_output(fp32_path, head)
    export_s = time.perf_counter() - t0
    bar.update()

    onnx_logits = verify_onnx(fp32_path, head, x, labels, ref, info, verification)
    verification["features"] = verify_features(fp32_path, features_name, x, feats)
    bar.update()
    if precision != "fp32":
        # the converters run on the graph with logits as its one output (an output that also feeds the head breaks
        # fp16's casts); the features come back as an output of the converted graph below
        remove_output(fp32_path, features_name)
    if precision == "fp16":
        to_fp16(fp32_path, tmp / "model.onnx", verification["graph"])
        expose_output(tmp / "model.onnx", features_name, head.num_features)
        check_model(tmp / "model.onnx")
        verification["fp16"] = verify_fp16(tmp / "model.onnx", fp32_path, x, labels, onnx_logits, ref,
                                           per_row_constant(head), info)
    elif precision == "int8":
        g = verification["graph"]
        normalisation = [n for n, op in zip(g["head_nodes"], g["head_ops"]) if op != "Gemm"]
        verification["int8"] = build_int8(run, head, Int8Inputs(fp32_path, split, x, labels, onnx_logits, ref,
                                                                normalisation), tmp / "model.onnx", int8)
        expose_output(tmp / "model.onnx", features_name, head.num_features)
        check_model(tmp / "model.onnx")
    if precision != "fp32":
        fp32_path.unlink()
        bar.update()
    verification["jpeg_draft"] = check_jpeg_draft(run, cfg.preprocess, tmp / "model.onnx", draft)
    if draft.mode != "off":
        bar.update()
    spec = cfg.preprocess.model_copy(update={"allow_draft": verification["jpeg_draft"]["decision"] == "on"})
    if "pt2" in formats:
        verification["pt2"] = write_pt2(program, tmp / "model.pt2", x, onnx_logits)
        bar.update()
    verification["exporter"] = {"name": "torch.onnx.export(dynamo=True) from torch.export", "torch": torch.__version__,
                                "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
                                "export_seconds": export_s, "total_seconds": time.perf_counter() - t_start}
    open_set_section, stats = open_set_info(run, head, features_name, *open_set)
    if stats is not None:
        embed_stats(tmp / "model.onnx", stats)
    meta = _describe(run, out_dir, tmp, head, spec, verification, precision, command,
                     ["model.onnx", *(["model.pt2"] if "pt2" in formats else [])], features_name, open_set_section)
    bar.update()
    return meta


def _describe(run: Run, out_dir: Path, tmp: Path, head: CalibratedHead, spec: PreprocessSpec,
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


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "unknown"))
