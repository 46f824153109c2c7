"""The checks a package passes before it is written: ONNX Runtime against the unfolded head (fp32), fp16 against
fp32 per shot group, and the reloaded `model.pt2` against the ONNX logits. Thresholds and measured values go into
`model.json` (`verification`); a failed check raises PackageError and nothing is written.

- fp32: max |ONNX - unfolded| <= FP32_RTOL * max(1, max |unfolded|) and top-1 agreement >= MIN_TOP1_AGREEMENT;
  batch 1 and batch 7 give the same rows as the full batch (a frozen batch dimension fails here);
- fp16: float16 weights, float32 input and output; top-1 agreement with fp32 and the change of the Many / Medium /
  Few / All accuracy on the same images, and the file size;
- pt2: `torch.export.load` of the saved program vs the ONNX logits;
- lws scales (lws, lws+la): a non-positive scale refuses the export (a head fitted before ltserve kept scales
  positive: it reverses that class's logits); a tiny one (`ltserve.heads.lws.TINY_SCALE`) is logged and listed in
  `verification["warnings"]`, so the package says what its head does to those classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ltserve.errors import PackageError
from ltserve.export.graph import INPUT_NAME, OUTPUT_NAME, check_head_subgraph, check_model
from ltserve.heads import CalibratedHead
from ltserve.heads.lws import scale_check
from ltserve.metrics import SHOT_GROUPS, classification_report
from ltserve.rundir import RunInfo

VERIFY_IMAGES = 256
FP32_RTOL = 1e-4
"""fp32 check: max |ONNX - unfolded| <= FP32_RTOL * max(1, max |unfolded|) (float64 reference, ~1e-6 seen)."""
MIN_TOP1_AGREEMENT = 0.99
FP16_MIN_TOP1_AGREEMENT = 0.98
FP16_MAX_GROUP_DROP = 0.03
"""fp16 check: no Many / Medium / Few / All accuracy drops by more than this (absolute) on the verification images."""
FP16_MAX_SIZE_RATIO = 0.75
PT2_TOL = 1e-4


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
    opts.log_severity_level = 3  # fp16 graphs make ORT warn about the casts it inserts on CPU
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run(session: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out)



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


def verify_fp32(path: Path, x: np.ndarray, ref: np.ndarray, per_row: bool) -> tuple[dict[str, Any], np.ndarray]:
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


def group_accuracy(logits: np.ndarray, labels: np.ndarray, info: RunInfo) -> dict[str, float | None]:
    rep = classification_report(logits, labels, info.class_counts, info.many_threshold, info.few_threshold)
    return {k: rep[k] for k in ("top1", "balanced_accuracy", *SHOT_GROUPS)}


def verify_fp16(path: Path, fp32_path: Path, x: np.ndarray, labels: np.ndarray, fp32_logits: np.ndarray,
                 ref: np.ndarray, per_row: bool, info: RunInfo) -> dict[str, Any]:
    """fp16 vs fp32 on the same images: top-1 agreement, Many/Medium/Few/All accuracy change, size; float32 I/O."""
    import onnx

    model = onnx.load(str(path))
    io_types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    logits = _run(_session(path), x)
    diff, _, _ = _compare(logits, ref, per_row_constant=per_row)
    agree = float(np.mean(logits.argmax(axis=1) == fp32_logits.argmax(axis=1)))
    acc32, acc16 = group_accuracy(fp32_logits, labels, info), group_accuracy(logits, labels, info)
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


def write_pt2(program: torch.export.ExportedProgram, path: Path, x: np.ndarray,
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


def per_row_constant(head: CalibratedHead) -> bool:
    """Euclidean ncm equals its folded layer only up to a per-row constant (-||x'||^2); every other head exactly."""
    return head.feature_transform == "centred_l2" and head.meta.get("metric", "euclidean") == "euclidean"


def verify_onnx(path: Path, head: CalibratedHead, x: np.ndarray, labels: np.ndarray, ref: np.ndarray, info: RunInfo,
                 verification: dict[str, Any]) -> np.ndarray:
    """Checker, graph structure and ONNX Runtime vs the unfolded head; fills `verification`, returns the logits."""
    import onnx

    check_model(path)
    verification["graph"] = check_head_subgraph(onnx.load(str(path)), head)
    verification["fp32"], logits = verify_fp32(path, x, ref, per_row_constant(head))
    verification["accuracy"] = group_accuracy(logits, labels, info)
    return logits


def check_scales(head: CalibratedHead, class_names: Sequence[str]) -> list[str]:
    """The warnings about a head's lws scales (extras["scales"], f (C,)); [] for a head without scales.

    Raises:
        PackageError: a scale is <= 0, naming the head, the classes and the fix.
    """
    if "scales" not in head.extras:
        return []
    check = scale_check(head.extras["scales"], class_names)
    if check["non_positive"]:
        raise PackageError(f"heads/{head.method}.safetensors: head {head.method!r} cannot be exported: "
                           f"{check['warnings'][0]}; re-fit it with `ltserve rebalance RUN --heads {head.method}` "
                           "(scales are now kept positive) or export another head")
    return list(check["warnings"])

