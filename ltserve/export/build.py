"""`export_package`: load a run's head and backbone, export the folded graph, verify it, convert it (fp16 / int8),
decide JPEG draft decoding, calibrate open-set rejection, and write the package, built in a temporary folder and
moved into place only once every check has passed."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ltserve.errors import ConfigError, PackageError, RunError, unknown_choice
from ltserve.export.describe import describe
from ltserve.export.draft import JpegDraftOptions, check_jpeg_draft
from ltserve.export.fold import FoldedClassifier
from ltserve.export.graph import (MIN_OPSET, add_features_output, check_model, expose_output, export_onnx,
                                  remove_output, to_fp16)
from ltserve.export.open_set import check_override, embed_stats, open_set_info, verify_features
from ltserve.export.reference import backbone_features, unfolded_logits, verification_images
from ltserve.export.quantize import Int8Inputs, Int8Options, build_int8
from ltserve.export.verify import VERIFY_IMAGES, per_row_constant, verify_fp16, verify_onnx, write_pt2
from ltserve.features.backbones import load_run_backbone
from ltserve.heads import HEADS, CalibratedHead
from ltserve.open_set import DEFAULT_TARGET
from ltserve.package import MODEL_JSON, ModelJson
from ltserve.progress import progress_bar
from ltserve.rundir import Run, open_run

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
PRECISIONS = ("fp32", "fp16", "int8")
INT8_VERIFY_IMAGES = 2000
"""int8's default verification sample: its bounds are a point or less per shot group, and with 256 images a few-shot
group of two classes holds ~50 images, where one flipped image moves its accuracy by 2 points."""


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
        # the same class (QualityGateRefused stays one: `ltserve` exits 3 on a refused gate, 2 on other failures)
        raise type(exc)(f"export of head {head!r} from {run.root} failed, nothing written to {out_dir}: {exc}") \
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
    # the method's own checks (lws: scales) before the slow steps; a head that must not ship raises here
    warnings = HEADS.get(head_name).check(head, info.class_names)
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
    meta = describe(run, out_dir, tmp, head, spec, verification, precision, command,
                     ["model.onnx", *(["model.pt2"] if "pt2" in formats else [])], features_name, open_set_section)
    bar.update()
    return meta


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "unknown"))
