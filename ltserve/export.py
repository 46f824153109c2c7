"""Fold a head into one Gemm and export a verified model package: `model.onnx` (+ `model.pt2`) and `model.json`.

    ltserve export runs/NAME --head HEAD --out models/NAME [--fp16] [--opset N] [--format onnx[,pt2]]

The exported graph is  backbone -> (ncm only: x -> (x - mu) / max(||x - mu||, eps)) -> Gemm -> logits,  where the
Gemm holds the head's folded layer (W / T, b / T) from `CalibratedHead.folded()` (`../shared/reference/decoupling.md`,
"Folding"). Every folded head therefore has exactly the node count of the joint export; ncm adds its four
normalisation nodes (Sub, ReduceL2, Clip, Div).

Exporter: `torch.export.export` (dynamic batch) -> `torch.onnx.export(..., dynamo=True, external_data=False)`, whose
onnxscript optimiser constant-folds the graph (BatchNorm folded into Conv, one Gemm with transB=1 for the head). The
legacy TorchScript exporter is ~20x faster on a CIFAR ResNet (0.05 s vs ~1 s) but deprecated and leaves Identity
nodes in the graph; the same ExportedProgram also gives `model.pt2`, so the dynamo path is the one kept. Opset >= 18.

Verification is part of export and a package that fails it is never written (it is built in a temporary folder
beside the target and moved into place at the end):

- `onnx.checker.check_model(full_check=True)`; the graph's head is exactly one Gemm holding (W / T, b / T) (ncm:
  plus the normalisation chain holding mu); the batch dimension is symbolic;
- ONNX Runtime logits vs the UNFOLDED head in torch on real images of the run's test split: backbone features, then
  the method's own formula from its parameters (joint W, b with tau / scales / tau_la / prior; ncm: negative squared
  distance to the centroids, compared after removing each row's mean), divided by T: max |diff| and top-1 agreement;
  batch 1 and batch 7 give the same rows as the full batch;
- `--fp16`: float16 weights, float32 input and output; top-1 agreement with fp32 and the change of the Many / Medium /
  Few accuracy on the same images, and the file size;
- `model.pt2` (`--format onnx,pt2`): `torch.export.load` of the saved program vs the ONNX logits.

The thresholds and measured values are recorded in `model.json` (`verification`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ltserve import __version__
from ltserve.config import HEAD_NAMES, Config, config_from_dict, config_hash, unknown_choice
from ltserve.errors import ConfigError, PackageError, RunError
from ltserve.heads import L2_EPS, CalibratedHead, list_heads, load_head
from ltserve.metrics import SHOT_GROUPS, classification_report, shot_groups
from ltserve.package import (MODEL_JSON, GraphInfo, HeadInfo, ModelJson, Provenance, ShotThresholds,
                             file_entries, load_package, write_model_json)
from ltserve.preprocess import PreprocessSpec
from ltserve.rundir import RunInfo, RunPaths, git_commit, read_run, utc_now

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FORMATS = ("onnx", "pt2")
MIN_OPSET = 18
"""The dynamo exporter writes opset 18 or newer (older requests are silently kept at 18, so they are refused)."""
NORMALISATION_OPS = ("Sub", "ReduceL2", "Clip", "Div")
"""The ops of ncm's fixed centring + L2 normalisation, in graph order, before the Gemm."""
PRIOR_KEY = "target_log_prior"
"""Head extras key of the target-prior shift added to the bias (see `ltserve.rebalance.prior`)."""

VERIFY_IMAGES = 256
FP32_RTOL = 1e-4
"""fp32 check: max |ONNX - unfolded| <= FP32_RTOL * max(1, max |unfolded|) (float64 reference, ~1e-6 seen)."""
MIN_TOP1_AGREEMENT = 0.99
FP16_MIN_TOP1_AGREEMENT = 0.98
FP16_MAX_GROUP_DROP = 0.03
"""fp16 check: no Many / Medium / Few / All accuracy drops by more than this (absolute) on the verification images."""
FP16_MAX_SIZE_RATIO = 0.75
PT2_TOL = 1e-4
MAX_BATCH = 1 << 16


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


# --------------------------------------------------------------------------------------------------------------
# The unfolded reference: each method's formula from its parameters, in torch (float64)
# --------------------------------------------------------------------------------------------------------------


def _param(head: CalibratedHead, key: str) -> Any:
    """A head parameter from meta, or from meta["base_meta"] for compositions (tau_norm+la keeps tau there)."""
    for meta in (head.meta, head.meta.get("base_meta") or {}):
        if key in meta:
            return meta[key]
    raise PackageError(f"heads/{head.method}.json: meta has no {key!r}, so the head cannot be checked against its "
                       f"method; re-fit it with `ltserve rebalance RUN --heads {head.method}`")


def _extra(head: CalibratedHead, key: str) -> np.ndarray:
    if key not in head.extras:
        raise PackageError(f"heads/{head.method}.safetensors: no extras.{key}, so the head cannot be checked against "
                           f"its method; re-fit it with `ltserve rebalance RUN --heads {head.method}`")
    return head.extras[key]


def _raw_bias(head: CalibratedHead) -> np.ndarray:
    """The bias without the target-prior shift (float64)."""
    shift = head.extras.get(PRIOR_KEY)
    return head.bias.astype(np.float64) - (0.0 if shift is None else shift.astype(np.float64))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _ncm_logits(head: CalibratedHead, x: torch.Tensor) -> torch.Tensor:
    """-||x' - c_j||^2 (euclidean) or x' . c_j / ||c_j|| (cosine), x' = centred, L2-normalised features."""
    x = x - _t(head.centre)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(L2_EPS)
    centroids = _t(_extra(head, "centroids"))
    if head.meta.get("metric", "euclidean") == "cosine":
        return x @ (centroids / torch.linalg.vector_norm(centroids, dim=1, keepdim=True).clamp_min(L2_EPS)).T
    # row chunks bound memory at (chunk, C, D); the direct difference (not the folded expansion) is the reference
    return torch.cat([-((xc[:, None, :] - centroids[None]) ** 2).sum(-1) for xc in x.split(16)])


def _linear_params(head: CalibratedHead, joint: CalibratedHead) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a linear method recomputed from the joint head and the method's parameters (before la)."""
    base = head.method.removesuffix("+la")
    w0, b0 = _t(joint.weight), _t(_raw_bias(joint))
    if base in ("joint", "la"):
        return w0, b0
    if base == "crt":
        return _t(head.weight), _t(_raw_bias(head))
    if base == "tau_norm":
        tau = float(_param(head, "tau"))
        norms = torch.linalg.vector_norm(w0, dim=1, keepdim=True).clamp_min(L2_EPS)
        return w0 / norms**tau, (b0 if bool(_param(head, "keep_bias")) else torch.zeros_like(b0))
    if base == "lws":
        f = _t(_extra(head, "scales"))
        return f[:, None] * w0, f * b0
    raise ConfigError(unknown_choice("head", head.method, HEAD_NAMES))


def unfolded_logits(head: CalibratedHead, joint: CalibratedHead, features: torch.Tensor,
                    class_counts: Sequence[int]) -> torch.Tensor:
    """The head's logits from its method's definition, independent of its stored folded layer (except crt).

    joint: x W0^T + b0; tau_norm: W0_j / ||W0_j||^tau, b0 or 0; lws: f_j (W0_j x + b0_j); la: - tau_la log pi_j with
    pi_j = n_j / N from the run's training counts; compositions apply la after their base; ncm: -||x' - c_j||^2
    (equal to the folded layer up to a per-row constant); then + log pi_target (when stored) and / T.

    Args:
        head: the head to reconstruct.
        joint: the run's joint head (W0, b0; its own target prior and temperature are removed).
        features: (N, D) pooled backbone features.
        class_counts: (C,) training counts.

    Returns:
        (N, C) float64 logits.
    """
    x = features.detach().to(torch.float64)
    if head.method == "ncm":
        z = _ncm_logits(head, x)
    else:
        w, b = _linear_params(head, joint)
        z = x @ w.T + b
        if head.method == "la" or head.method.endswith("+la"):
            counts = np.asarray(class_counts, dtype=np.float64)
            z = z - float(_param(head, "tau_la")) * _t(np.log(counts / counts.sum()))
    shift = head.extras.get(PRIOR_KEY)
    if shift is not None:
        z = z + _t(shift)
    return z / head.temperature


# --------------------------------------------------------------------------------------------------------------
# Verification inputs: real images of the run's test split
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _verification_images(data_json: str, spec_json: str, n: int) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(images float32 NCHW (n, C, H, W), labels (n,), split name, data fingerprint); cached (read-only)."""
    from ltserve.config import DataConfig
    from ltserve.data import stratified_subsample
    from ltserve.features import splits_for
    from ltserve.preprocess import to_model_input, transform_image

    splits = splits_for(DataConfig.model_validate_json(data_json))  # shared with the feature cache (once per process)
    split, images = ("test", splits.test) if splits.test is not None and len(splits.test) else ("val", splits.val)
    if images is None or len(images) == 0:
        raise RunError("the run's data set has no test or val images to verify an export on")
    idx = stratified_subsample(images.labels, n, seed=0)  # every class represented, for the shot-group check
    spec = PreprocessSpec.model_validate_json(spec_json)
    x = to_model_input([transform_image(images.load(int(i)), spec) for i in idx], spec)
    x.setflags(write=False)
    labels = images.labels[idx].copy()
    labels.setflags(write=False)
    return x, labels, split, splits.fingerprint


# --------------------------------------------------------------------------------------------------------------
# ONNX graph: export, structure, running
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's optimiser logs every pass at INFO (and warns about things export checks itself): keep
    those loggers at WARNING / ERROR while exporting, restoring their levels after."""
    levels = {name: logging.getLogger(name).level for name in _EXPORTER_LOGGERS}
    for name, level in _EXPORTER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


_EXPORTER_LOGGERS = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.ERROR,
                     "torch.export": logging.ERROR, "torch._export": logging.ERROR}


def _export_program(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # a backbone that cannot trace with a dynamic batch
        raise PackageError(f"torch.export of the model failed ({type(exc).__name__}: {exc}); the backbone must "
                           "trace with a symbolic batch dimension") from exc


def _write_onnx(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path,
                opset: int | None) -> None:
    """ExportedProgram -> one-file ONNX at `path` (constant-folded, batch dimension named "batch")."""
    import onnx

    torch.onnx.export(program, (example,), str(path), dynamo=True, external_data=False, optimize=True,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, verbose=False)
    model = onnx.load(str(path))
    got = _opset(model)
    if opset is not None and got != opset:
        raise ConfigError(f"--opset {opset}: the exporter produced opset {got}; choose an opset the installed "
                          f"torch/onnxscript support (>= {MIN_OPSET})")
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise PackageError(f"{path}: the batch dimension was frozen to {dim.dim_value}; export needs a symbolic batch")
    old = dim.dim_param
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = "batch"
    # per-node export metadata holds stack traces with this machine's paths: not part of the model
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info, *model.graph.initializer]:
        del value.metadata_props[:]
    onnx.save(model, str(path))


def _opset(model: Any) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def graph_info(model: Any, precision: str) -> GraphInfo:
    """Opset, node count, op counts (sorted by op name) and precision of an ONNX ModelProto."""
    ops = Counter(n.op_type for n in model.graph.node)
    return GraphInfo(opset=_opset(model), nodes=len(model.graph.node), op_counts=dict(sorted(ops.items())),
                     precision=precision)  # type: ignore[arg-type]


def _check_head_subgraph(model: Any, head: CalibratedHead) -> dict[str, Any]:
    """Assert the graph ends in exactly the folded head: one Gemm holding (W / T, b / T), for ncm preceded by the
    normalisation chain holding mu, and nothing else after the backbone's pooled features.

    Returns:
        {"head_ops": [...], "backbone_nodes": int}.

    Raises:
        PackageError: any other structure (e.g. MatMul + Add, a second Gemm, a missing normalisation node).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    fail = "model.onnx: "
    if len(gemms) != 1 or gemms[0].output[0] != OUTPUT_NAME:
        raise PackageError(fail + f"expected exactly one Gemm producing {OUTPUT_NAME!r}, found "
                           f"{[n.op_type for n in graph.node if n.output[0] == OUTPUT_NAME]} and {len(gemms)} Gemm")
    gemm = gemms[0]
    attrs = {a.name: a for a in gemm.attribute}
    weight, bias = head.folded()
    got_w = inits.get(gemm.input[1])
    # the optimiser drops an all-zero bias (tau_norm without bias): still one Gemm, C absent
    got_b = inits.get(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else np.zeros_like(bias)
    if got_w is not None and not (attrs["transB"].i if "transB" in attrs else 0):
        got_w = got_w.T
    trans_a = attrs["transA"].i if "transA" in attrs else 0
    if trans_a or any(attrs[k].f != 1.0 for k in ("alpha", "beta") if k in attrs):
        raise PackageError(fail + "the Gemm must be x W^T + b (transA=0, alpha=beta=1)")
    if (got_w is None or got_w.shape != weight.shape or got_b.shape != bias.shape
            or not (np.allclose(got_w, weight, rtol=1e-6, atol=0) and np.allclose(got_b, bias, rtol=1e-6, atol=1e-12))):
        raise PackageError(fail + "the Gemm does not hold the folded weights (W / T, b / T)")
    head_nodes = [gemm]
    if head.feature_transform == "centred_l2":
        head_nodes = _normalisation_chain(producer, inits, gemm.input[0], head, fail) + head_nodes
    return {"head_ops": [n.op_type for n in head_nodes], "head_nodes": [n.name for n in head_nodes],
            "backbone_nodes": len(graph.node) - len(head_nodes)}


def _normalisation_chain(producer: dict, inits: dict, gemm_in: str, head: CalibratedHead, fail: str) -> list:
    """Match Div(Sub(F, mu), Clip(ReduceL2(Sub))) feeding the Gemm; return the nodes in NORMALISATION_OPS order."""
    div = producer.get(gemm_in)
    sub = producer.get(div.input[0]) if div is not None and div.op_type == "Div" else None
    clip = producer.get(div.input[1]) if sub is not None else None
    red = producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else None
    ok = (sub is not None and sub.op_type == "Sub" and red is not None and red.op_type == "ReduceL2"
          and red.input[0] == sub.output[0] and sub.input[1] in inits
          and np.allclose(inits[sub.input[1]].reshape(-1), head.centre, rtol=1e-6, atol=1e-7))
    if not ok:
        raise PackageError(fail + "expected the normalisation Sub(mu) -> ReduceL2 -> Clip -> Div before the Gemm")
    return [sub, red, clip, div]


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
    opts.log_severity_level = 3  # fp16 graphs make ORT warn about the casts it inserts on CPU
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run(session: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------


def _compare(got: np.ndarray, ref: np.ndarray, per_row_constant: bool) -> tuple[float, float, float]:
    """(max |got - ref|, tolerance, top-1 agreement); rows centred first when only differences matter (ncm)."""
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    if per_row_constant:
        got64 = got64 - got64.mean(axis=1, keepdims=True)
        ref64 = ref64 - ref64.mean(axis=1, keepdims=True)
    diff = float(np.abs(got64 - ref64).max())
    tol = FP32_RTOL * max(1.0, float(np.abs(ref64).max()))
    agree = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
    return diff, tol, agree


def _verify_fp32(path: Path, x: np.ndarray, ref: np.ndarray, per_row: bool) -> tuple[dict[str, Any], np.ndarray]:
    """ONNX Runtime vs the unfolded reference, and the symbolic batch (batch 1 and 7 rows == full-batch rows)."""
    session = _session(path)
    logits = _run(session, x)
    diff, tol, agree = _compare(logits, ref, per_row_constant=per_row)
    n7 = min(7, len(x))  # batch 1 and an odd batch: a frozen batch dimension fails here
    one = session.run([OUTPUT_NAME], {INPUT_NAME: x[:1]})[0]
    seven = session.run([OUTPUT_NAME], {INPUT_NAME: x[:n7]})[0]
    batch_diff = float(max(np.abs(one - logits[:1]).max(), np.abs(seven - logits[:n7]).max()))
    report = {"images": int(len(x)), "max_abs_diff": diff, "tolerance": tol, "top1_agreement": agree,
              "min_top1_agreement": MIN_TOP1_AGREEMENT, "compared": "up to a per-row constant" if per_row else "exact",
              "batch_sizes_run": [1, n7, int(min(64, len(x)))], "batch_max_abs_diff": batch_diff}
    errors = []
    if not diff <= tol:
        errors.append(f"max |ONNX - unfolded| = {diff:.3g} > {tol:.3g}")
    if agree < MIN_TOP1_AGREEMENT:
        errors.append(f"top-1 agreement {agree:.4f} < {MIN_TOP1_AGREEMENT}")
    if one.shape != (1, ref.shape[1]) or seven.shape != (n7, ref.shape[1]) or not batch_diff <= tol:
        errors.append(f"batch 1 / batch {n7} outputs differ from the full batch by {batch_diff:.3g}")
    if errors:
        raise PackageError(f"{path.name}: verification against the unfolded head failed: " + "; ".join(errors))
    return report, logits


def _group_accuracy(logits: np.ndarray, labels: np.ndarray, info: RunInfo) -> dict[str, float | None]:
    rep = classification_report(logits, labels, info.class_counts, info.many_threshold, info.few_threshold)
    return {k: rep[k] for k in ("top1", "balanced_accuracy", *SHOT_GROUPS)}


def _to_fp16(src: Path, dst: Path, head_check: dict[str, Any]) -> None:
    """float16 weights, float32 input/output. ncm's normalisation nodes compute in float32 (the converter casts their
    inputs back): a sum of squares over D features can overflow float16's 65504."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    keep = [name for name, op in zip(head_check["head_nodes"], head_check["head_ops"]) if op in NORMALISATION_OPS]
    with warnings.catch_warnings():
        # "the float32 number ... will be truncated to 1e-07": tiny constants (the 1e-12 norm floor, tiny weights)
        # are clamped to float16's range on purpose; the accuracy check below measures the effect
        warnings.filterwarnings("ignore", message=".*will be truncated to", category=UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep or None)
    onnx.save(converted, str(dst))


def _verify_fp16(path: Path, fp32_path: Path, x: np.ndarray, labels: np.ndarray, fp32_logits: np.ndarray,
                 ref: np.ndarray, per_row: bool, info: RunInfo) -> dict[str, Any]:
    """fp16 vs fp32 on the same images: top-1 agreement, Many/Medium/Few/All accuracy change, size; float32 I/O."""
    import onnx

    model = onnx.load(str(path))
    io_types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    logits = _run(_session(path), x)
    diff, _, _ = _compare(logits, ref, per_row_constant=per_row)
    agree = float(np.mean(logits.argmax(axis=1) == fp32_logits.argmax(axis=1)))
    acc32, acc16 = _group_accuracy(fp32_logits, labels, info), _group_accuracy(logits, labels, info)
    change = {k: (None if acc32[k] is None else acc16[k] - acc32[k]) for k in acc32}
    ratio = path.stat().st_size / fp32_path.stat().st_size
    report = {"top1_agreement_vs_fp32": agree, "min_top1_agreement": FP16_MIN_TOP1_AGREEMENT,
              "accuracy_fp32": acc32, "accuracy_fp16": acc16, "accuracy_change": change,
              "max_accuracy_drop": FP16_MAX_GROUP_DROP, "max_abs_diff_vs_unfolded": diff,
              "bytes_fp32": fp32_path.stat().st_size, "bytes_fp16": path.stat().st_size, "size_ratio": ratio,
              "max_size_ratio": FP16_MAX_SIZE_RATIO}
    errors = []
    if io_types != {onnx.TensorProto.FLOAT}:
        errors.append("input and output must stay float32")
    if agree < FP16_MIN_TOP1_AGREEMENT:
        errors.append(f"top-1 agreement with fp32 {agree:.4f} < {FP16_MIN_TOP1_AGREEMENT}")
    drops = {k: v for k, v in change.items() if v is not None and v < -FP16_MAX_GROUP_DROP}
    if drops:
        errors.append(f"accuracy drops {drops} exceed {FP16_MAX_GROUP_DROP}")
    if ratio > FP16_MAX_SIZE_RATIO:
        errors.append(f"fp16 file is {ratio:.2f} x the fp32 size (> {FP16_MAX_SIZE_RATIO})")
    if errors:
        raise PackageError(f"{path.name}: fp16 verification failed: " + "; ".join(errors))
    return report


def _write_pt2(program: torch.export.ExportedProgram, path: Path, x: np.ndarray,
               onnx_logits: np.ndarray) -> dict[str, Any]:
    """Save the folded model as a torch.export program and check its reload against the fp32 ONNX logits."""
    # without example inputs torch.export.save writes no torch.save (pickle) member: weights and graph only
    program.example_inputs = None
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        got = torch.cat([loaded(torch.from_numpy(np.array(x[i:i + 64]))) for i in range(0, len(x), 64)]).numpy()
        seven = loaded(torch.from_numpy(np.array(x[:7]))).numpy()
    diff = float(max(np.abs(got - onnx_logits).max(), np.abs(seven - onnx_logits[:7]).max()))
    tol = PT2_TOL * max(1.0, float(np.abs(onnx_logits).max()))
    if not diff <= tol:
        raise PackageError(f"{path.name}: torch.export program differs from model.onnx by {diff:.3g} > {tol:.3g}")
    return {"max_abs_diff_vs_onnx": diff, "tolerance": tol, "precision": "fp32", "dynamic_batch": True}


# --------------------------------------------------------------------------------------------------------------
# model.json contents
# --------------------------------------------------------------------------------------------------------------


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


def _eval_entry(paths: RunPaths, split: str, head: str) -> dict[str, Any] | None:
    """The head's entry in `eval/<split>.json` ({"heads": {head: ...}} or {head: ...}), if evaluate wrote one."""
    path = paths.eval / f"{split}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        log.warning("%s: not valid JSON; its metrics are left out", path)
        return None
    entry = (data.get("heads") if isinstance(data.get("heads"), dict) else data).get(head)
    return entry if isinstance(entry, dict) else None


def head_metrics(run_dir: str | Path, head: CalibratedHead) -> dict[str, Any]:
    """A head's recorded metrics: val from its meta (or eval/val.json), test from eval/test.json when present."""
    paths = RunPaths(run_dir)
    out: dict[str, Any] = {}
    val = head.meta.get("val") if isinstance(head.meta.get("val"), dict) else _eval_entry(paths, "val", head.method)
    if val is not None:
        out["val"] = val
    test = _eval_entry(paths, "test", head.method)
    if test is not None:
        out["test"] = test
    return out


def best_head(run_dir: str | Path) -> str:
    """The run's head with the highest val accuracy (balanced accuracy when every head has it, else top-1).

    A head's val metrics come from its meta (`meta["val"]`, written by rebalance), else from `eval/val.json`, else
    (the joint head of a run that was never evaluated on val) they are computed from the cached val features.
    Ties go to the earlier name in HEAD_NAMES (joint, crt, tau_norm, ...).

    Raises:
        RunError: the run has no head.
    """
    paths = RunPaths(run_dir)
    names = list_heads(paths.heads)
    if not names:
        raise RunError(f"{paths.heads}: no heads; train the run first (`ltserve train CONFIG --out {paths.root}`)")
    scores: dict[str, dict[str, Any]] = {}
    for name in names:
        head = load_head(paths.heads, name)
        scores[name] = head_metrics(run_dir, head).get("val") or _computed_val_metrics(run_dir, head)
    key = "balanced_accuracy" if all(v.get("balanced_accuracy") is not None for v in scores.values()) else "top1"
    best = max(scores, key=lambda n: (float(scores[n].get(key) or 0.0), -HEAD_NAMES.index(n)))
    log.info("best head by val %s: %s (%s)", key, best,
             ", ".join(f"{n} {float(v.get(key) or 0):.4f}" for n, v in scores.items()))
    return best


def _computed_val_metrics(run_dir: str | Path, head: CalibratedHead) -> dict[str, Any]:
    """classification_report of the head on the run's val split (cached features)."""
    from ltserve.features import cached_features

    info = read_run(run_dir)
    x, y = cached_features(run_dir, "val")
    log.info("best_head: %s has no recorded val metrics; computed them on %d cached val features", head.method,
             len(y))
    return classification_report(head.logits(x), y, info.class_counts, info.many_threshold, info.few_threshold)


def _provenance(run_dir: Path, cfg: Config, command: str | None) -> Provenance:
    cmd = os.environ.get("LTSERVE_COMMAND") or command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return Provenance(ltserve_version=__version__, git_commit=git_commit(), config_hash=config_hash(cfg),
                      created=utc_now(), command=cmd, run=str(run_dir))


# --------------------------------------------------------------------------------------------------------------
# export_package
# --------------------------------------------------------------------------------------------------------------


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """"onnx,pt2" or ("onnx", "pt2") -> validated tuple; onnx is always written (the package's serving format)."""
    items = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    for f in items:
        if f not in FORMATS:
            raise ConfigError(unknown_choice("--format", f, FORMATS))
    if "onnx" not in items:
        raise ConfigError(f"--format {','.join(items)}: a model package always holds model.onnx; use onnx or onnx,pt2")
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


def export_package(run_dir: str | Path, head: str, out_dir: str | Path, fp16: bool = False, opset: int | None = None,
                   formats: str | Sequence[str] = ("onnx",), *, verify_images: int = VERIFY_IMAGES,
                   command: str | None = None, progress: bool = True) -> ModelJson:
    """Fold `head` of a run, export it and write a verified model package to `out_dir`.

    Args:
        run_dir: a run directory with backbone.safetensors, run.json and heads/<head>.* (and heads/joint.*).
        head: one of HEAD_NAMES.
        out_dir: the package folder (created; an older package there is replaced once the new one is verified).
        fp16: store float16 weights (float32 input and output).
        opset: ONNX opset (>= 18); None uses the exporter's default.
        formats: "onnx" or "onnx,pt2" (pt2: also a torch.export program, `model.pt2`).
        verify_images: how many test-split images the checks run on (stratified, every class represented).
        command: the command line recorded in provenance (LTSERVE_COMMAND overrides; default sys.argv).
        progress: show a tqdm bar over the steps.

    Returns:
        the written ModelJson.

    Raises:
        ConfigError: unknown head or format, unsupported opset.
        RunError: the run or the head is missing or inconsistent.
        PackageError: a check failed (nothing is written), or out_dir is something other than a model package.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if head not in HEAD_NAMES:
        raise ConfigError(unknown_choice("--head", head, HEAD_NAMES))
    formats = parse_formats(formats)
    if opset is not None and opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: the exporter writes opset {MIN_OPSET} or newer; choose >= {MIN_OPSET}")
    _check_target(out_dir)
    steps = ["load", "export", "verify", *(["fp16"] if fp16 else []), *(["pt2"] if "pt2" in formats else []), "write"]
    bar = tqdm(total=len(steps), desc=f"export {head}", unit="step", disable=not progress, leave=False)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = _build(run_dir, head, out_dir, tmp, fp16, opset, formats, verify_images, command, bar, t_start)
        _move_into_place(tmp, out_dir)
    except PackageError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = f"export of head {head!r} from {run_dir} failed, nothing written to {out_dir}: {exc}"
        raise PackageError(msg) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    log.info("exported %s of %s to %s in %.1f s (%d nodes, %s, max |diff| %.2g)", head, run_dir, out_dir,
             time.perf_counter() - t_start, meta.graph.nodes, meta.graph.precision,
             meta.verification["fp32"]["max_abs_diff"])
    return meta


def _load_run(run_dir: Path, head_name: str) -> tuple[RunInfo, Config, CalibratedHead, CalibratedHead, nn.Module]:
    from ltserve.models import load_run_backbone

    backbone, info = load_run_backbone(run_dir)
    if not info.finished:
        log.warning("%s: stage 1 has not finished (%d epochs done); exporting its latest backbone",
                    RunPaths(run_dir).run_json, info.epochs_done)
    cfg = config_from_dict(info.config, f"{RunPaths(run_dir).run_json} (config)")
    heads_dir = RunPaths(run_dir).heads
    head = load_head(heads_dir, head_name)
    joint = head if head_name == "joint" else load_head(heads_dir, "joint")
    c, d = len(info.class_names), int(backbone.num_features)
    for h in {head.method: head, "joint": joint}.values():
        if h.weight.shape != (c, d):
            raise RunError(f"{heads_dir / (h.method + '.safetensors')}: weight is {h.weight.shape}, but the run has "
                           f"{c} classes and {d}-d features; re-fit the head")
    if head.method != head_name:
        raise RunError(f"{heads_dir / (head_name + '.json')}: holds method {head.method!r}, not {head_name!r}")
    return info, cfg, head, joint, backbone


def _build(run_dir: Path, head_name: str, out_dir: Path, tmp: Path, fp16: bool, opset: int | None,
           formats: tuple[str, ...], n_images: int, command: str | None, bar: Any, t_start: float) -> ModelJson:
    """Export, verify and describe into `tmp`; raise on the first failed check."""
    info, cfg, head, joint, backbone = _load_run(run_dir, head_name)
    x, labels, split, fingerprint = _verification_images(cfg.data.model_dump_json(), cfg.preprocess.model_dump_json(),
                                                         n_images)
    if fingerprint != info.data_fingerprint:
        log.warning("data fingerprint %s differs from the run's %s: verifying on the data set as it is now",
                    fingerprint, info.data_fingerprint)
    ref = unfolded_logits(head, joint, _features(backbone, x), info.class_counts).numpy()
    verification: dict[str, Any] = {"inputs": {"split": split, "images": int(len(x)), "data_fingerprint": fingerprint}}
    bar.update()

    t0 = time.perf_counter()
    fp32_path = tmp / ("model.fp32.onnx" if fp16 else "model.onnx")
    program = _export_onnx(FoldedClassifier(backbone, head).eval(), x, fp32_path, opset)
    export_s = time.perf_counter() - t0
    bar.update()

    onnx_logits = _verify_onnx(fp32_path, head, x, labels, ref, info, verification)
    bar.update()
    final, precision = fp32_path, "fp32"
    if fp16:
        final, precision = tmp / "model.onnx", "fp16"
        _to_fp16(fp32_path, final, verification["graph"])
        _check_model(final)
        verification["fp16"] = _verify_fp16(final, fp32_path, x, labels, onnx_logits, ref, _per_row(head), info)
        fp32_path.unlink()
        bar.update()
    if "pt2" in formats:
        verification["pt2"] = _write_pt2(program, tmp / "model.pt2", x, onnx_logits)
        bar.update()
    verification["exporter"] = {"name": "torch.onnx.export(dynamo=True) from torch.export", "torch": torch.__version__,
                                "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
                                "export_seconds": export_s, "total_seconds": time.perf_counter() - t_start}
    meta = _model_json(run_dir, out_dir, tmp, info, cfg, head, verification, precision, command,
                       ["model.onnx", *(["model.pt2"] if "pt2" in formats else [])])
    bar.update()
    return meta


def _features(backbone: nn.Module, x: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Pooled backbone features (N, D) of model input (N, C, H, W), in torch, no grad."""
    with torch.no_grad():
        return torch.cat([backbone.forward_head(backbone.forward_features(torch.from_numpy(np.array(x[i:i + batch]))),
                                                pre_logits=True) for i in range(0, len(x), batch)])


def _export_onnx(module: nn.Module, x: np.ndarray, path: Path, opset: int | None) -> torch.export.ExportedProgram:
    """torch.export the folded module (symbolic batch) and write its ONNX graph; returns the program (for pt2)."""
    example = torch.from_numpy(np.array(x[:2]))  # batch >= 2, or torch.export specialises the batch to 1
    with _quiet_exporter():
        program = _export_program(module, example)
        _write_onnx(program, example, path, opset)
    return program


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise PackageError(f"{path.name}: onnx.checker failed: {exc}") from exc


def _per_row(head: CalibratedHead) -> bool:
    """Euclidean ncm equals its folded layer only up to a per-row constant (-||x'||^2); every other head exactly."""
    return head.feature_transform == "centred_l2" and head.meta.get("metric", "euclidean") == "euclidean"


def _verify_onnx(path: Path, head: CalibratedHead, x: np.ndarray, labels: np.ndarray, ref: np.ndarray, info: RunInfo,
                 verification: dict[str, Any]) -> np.ndarray:
    """Checker, graph structure and ONNX Runtime vs the unfolded head; fills `verification`, returns the logits."""
    import onnx

    _check_model(path)
    verification["graph"] = _check_head_subgraph(onnx.load(str(path)), head)
    verification["fp32"], logits = _verify_fp32(path, x, ref, _per_row(head))
    verification["accuracy"] = _group_accuracy(logits, labels, info)
    return logits


def _model_json(run_dir: Path, out_dir: Path, tmp: Path, info: RunInfo, cfg: Config, head: CalibratedHead,
                verification: dict[str, Any], precision: str, command: str | None, files: list[str]) -> ModelJson:
    """Describe the package in `tmp`, write model.json and read it back (schema and every sha256)."""
    import onnx

    meta = ModelJson(
        name=out_dir.name, labels=list(info.class_names), class_counts=list(info.class_counts),
        shot_groups=shot_groups(info.class_counts, info.many_threshold, info.few_threshold),
        shot_thresholds=ShotThresholds(many=info.many_threshold, few=info.few_threshold), preprocess=cfg.preprocess,
        head=HeadInfo(name=head.method, params=head_params(head), temperature=head.temperature),
        metrics=head_metrics(run_dir, head), verification=verification,
        graph=graph_info(onnx.load(str(tmp / "model.onnx")), precision), provenance=_provenance(run_dir, cfg, command),
        files=file_entries(tmp, files), input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    write_model_json(tmp, meta)
    load_package(tmp, verify=True)
    return meta


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "unknown"))


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltserve export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run directory (runs/NAME)")
    p.add_argument("--head", required=True, help=f"one of {', '.join(HEAD_NAMES)}, or 'best' (highest val accuracy)")
    p.add_argument("--out", type=Path, default=None, help="package folder (default: models/<run name>-<head>)")
    p.add_argument("--fp16", action="store_true", help="float16 weights, float32 input and output")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (>= {MIN_OPSET}; default: the exporter's)")
    p.add_argument("--format", default="onnx", help="onnx, or onnx,pt2 to also write a torch.export program")
    p.add_argument("--verify-images", type=int, default=VERIFY_IMAGES, help="test images the checks run on")
    return p


def cli(argv: list[str] | None = None) -> int:
    """`ltserve export`: fold, export, verify, write the package; prints a summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.verify_images < 8:
        raise ConfigError(f"--verify-images {args.verify_images}: use at least 8 (batch 1 and 7 are checked)")
    head = best_head(args.run_dir) if args.head == "best" else args.head
    out = args.out or Path("models") / f"{args.run_dir.name}-{head}"
    meta = export_package(args.run_dir, head, out, fp16=args.fp16, opset=args.opset, formats=args.format,
                          verify_images=args.verify_images, command=shlex.join(["ltserve", "export", *argv]))
    v = meta.verification
    size = sum(f.bytes for f in meta.files.values())
    print(f"{out}: head {head} (T={meta.head.temperature:.3g}), {meta.graph.precision}, opset {meta.graph.opset}, "
          f"{meta.graph.nodes} nodes, {size / 1e6:.2f} MB")
    print(f"  verified on {v['inputs']['images']} {v['inputs']['split']} images: max |diff| "
          f"{v['fp32']['max_abs_diff']:.2g} (tol {v['fp32']['tolerance']:.2g}), top-1 agreement "
          f"{v['fp32']['top1_agreement']:.4f}" + (f", fp16 agreement {v['fp16']['top1_agreement_vs_fp32']:.4f}"
                                                   if "fp16" in v else ""))
    for name, entry in meta.files.items():
        print(f"  {name}  {entry.bytes} bytes  sha256 {entry.sha256[:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
