"""The checks a package passes before it is written: ONNX Runtime against the unfolded head (fp32), fp16 or int8
against fp32 per shot group, and the reloaded `model.pt2` against the ONNX logits. Thresholds and measured values go
into `model.json` (`verification`); a failed check raises PackageError and nothing is written.

- fp32: max |ONNX - unfolded| <= FP32_RTOL * max(1, max |unfolded|) and top-1 agreement >= MIN_TOP1_AGREEMENT;
  batch 1 and batch 7 give the same rows as the full batch (a frozen batch dimension fails here);
- fp16 and int8 (`compare_precision`, one comparison with per-precision `PrecisionBounds`): float32 input and
  output; top-1 agreement with fp32 and the change of the Many / Medium / Few / All accuracy on the same images, and
  the file size. fp16: agreement >= 0.98, no group drops more than 3 points. int8: few-shot and All drops bounded
  (default 1.0 and 0.5 points), agreement reported;
- pt2: `torch.export.load` of the saved program vs the ONNX logits.

A method's own checks (lws: its scales) are its registry entry's `check` (`ltserve.heads.registry.HeadMethod`),
run by `ltserve.export.build` before these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ltserve.errors import PackageError
from ltserve.export.graph import INPUT_NAME, OUTPUT_NAME, check_head_subgraph, check_model
from ltserve.heads import HEADS, CalibratedHead
from ltserve.metrics import SHOT_GROUPS, classification_report, shot_groups
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


ACCURACY_KEYS = ("top1", "balanced_accuracy", *SHOT_GROUPS)
GROUP_LABELS = {"top1": "All", "balanced_accuracy": "Balanced", "many": "Many", "medium": "Medium", "few": "Few"}


def group_accuracy(logits: np.ndarray, labels: np.ndarray, info: RunInfo) -> dict[str, float | None]:
    """Top-1, balanced and Many / Medium / Few accuracy (fractions; None for a group with no image)."""
    rep = classification_report(logits, labels, info.class_counts, info.many_threshold, info.few_threshold)
    return {k: rep[k] for k in ACCURACY_KEYS}


@dataclass(frozen=True)
class PrecisionBounds:
    """What a reduced-precision graph (fp16, int8) must keep against the fp32 graph on the verification images.

    Attributes:
        max_drop: accuracy key ("many", "medium", "few", "top1", "balanced_accuracy") -> the largest allowed drop
            (fraction: 0.01 = 1.0 point); keys left out are reported, not checked.
        min_top1_agreement: the least share of images with the fp32 top-1 (None: reported, not checked).
        max_size_ratio: the largest file size relative to the fp32 graph (None: reported, not checked).
    """

    max_drop: dict[str, float]
    min_top1_agreement: float | None
    max_size_ratio: float | None


FP16_BOUNDS = PrecisionBounds(max_drop={k: FP16_MAX_GROUP_DROP for k in ACCURACY_KEYS},
                              min_top1_agreement=FP16_MIN_TOP1_AGREEMENT, max_size_ratio=FP16_MAX_SIZE_RATIO)
def int8_bounds(max_few_drop: float, max_all_drop: float) -> PrecisionBounds:
    """int8: few-shot and All accuracy drops bounded (the tail is what compression hurts first); agreement with
    fp32 and size reported, not checked (a few flips that cost no accuracy are no reason to refuse, and the size
    grows with every layer a retry keeps in float)."""
    return PrecisionBounds(max_drop={"few": max_few_drop, "top1": max_all_drop}, min_top1_agreement=None,
                           max_size_ratio=None)


def compare_groups(logits: np.ndarray, base_logits: np.ndarray, labels: np.ndarray, info: RunInfo,
                   max_drop: dict[str, float], min_top1_agreement: float | None = None,
                   base: str = "fp32") -> dict[str, Any]:
    """A faster path's logits against the exact path's on the same images, per shot group: the one accuracy
    comparison reduced precision (fp16, int8) and JPEG draft decoding (`ltserve.export.draft`) are accepted by.

    Args:
        logits, base_logits: (N, K) of the faster and the exact path.
        labels: (N,) true classes.
        info: the run (class counts, shot thresholds).
        max_drop: accuracy key -> the largest allowed drop (fraction); keys left out are reported, not checked.
        min_top1_agreement: the least share of images with the exact path's top-1 (None: reported, not checked).
        base: how the report names the exact path ("fp32", "exact").

    Returns:
        f"top1_agreement_vs_{base}", f"accuracy_{base}", "accuracy", "accuracy_change" (fractions; None for an empty
        group), "images_per_group", "max_accuracy_drop", "min_top1_agreement" and "failures" (one sentence per failed
        check).
    """
    agree = float(np.mean(logits.argmax(axis=1) == base_logits.argmax(axis=1)))
    acc_base, acc = group_accuracy(base_logits, labels, info), group_accuracy(logits, labels, info)
    change = {k: (None if acc_base[k] is None or acc[k] is None else acc[k] - acc_base[k]) for k in acc_base}
    groups = np.asarray(shot_groups(info.class_counts, info.many_threshold, info.few_threshold))[labels]
    failures = []
    if min_top1_agreement is not None and agree < min_top1_agreement:
        failures.append(f"top-1 agreement with {base} {agree:.4f} < {min_top1_agreement}")
    for key, limit in max_drop.items():
        if change.get(key) is not None and change[key] < -limit - 1e-12:
            failures.append(f"{GROUP_LABELS[key]} accuracy drops {-change[key] * 100:.2f} points "
                            f"(> {limit * 100:.2f})" if limit >= 0 else
                            f"{GROUP_LABELS[key]} accuracy changes {change[key] * 100:+.2f} points (a gain of at "
                            f"least {-limit * 100:.2f} is demanded)")
    return {f"top1_agreement_vs_{base}": agree, f"accuracy_{base}": acc_base, "accuracy": acc,
            "accuracy_change": change, "images_per_group": {g: int((groups == g).sum()) for g in SHOT_GROUPS},
            "max_accuracy_drop": max_drop, "min_top1_agreement": min_top1_agreement, "failures": failures}


TABLE_GROUPS = ("many", "medium", "few", "top1")


def group_table(lead: Sequence[str], rows: Sequence[tuple[Sequence[str], dict[str, Any]]], base: str = "fp32",
                per_group: dict[str, int] | None = None) -> str:
    """Comparisons (`compare_groups` reports) as a plain-text table: the leading cells of each row, agreement, and
    each group's exact -> faster accuracy with the change in points; a failed bound is marked with '!'.

    Args:
        lead: the headers of the leading columns (e.g. ["attempt", "float nodes"]).
        rows: (leading cells, report) per row.
        base: the exact path's name in the reports' keys.
        per_group: images per group, shown in the headers.
    """
    head = [*lead, "agree"] + [GROUP_LABELS[k] + (f" (n={per_group[k]})" if per_group and k in per_group else "")
                              for k in TABLE_GROUPS]
    lines = []
    for cells, r in rows:
        failed = " ".join(r["failures"])
        line = [*cells, f"{r[f'top1_agreement_vs_{base}']:.4f}"]
        for k in TABLE_GROUPS:
            before, after, change = r[f"accuracy_{base}"][k], r["accuracy"][k], r["accuracy_change"][k]
            mark = " !" if GROUP_LABELS[k] + " accuracy " in failed else ""
            line.append("empty" if change is None else
                        f"{before * 100:.1f} -> {after * 100:.1f} ({change * 100:+.2f}){mark}")
        lines.append(line)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *lines])


def compare_precision(precision: str, path: Path, fp32_path: Path, x: np.ndarray, labels: np.ndarray,
                      fp32_logits: np.ndarray, ref: np.ndarray, per_row: bool, info: RunInfo,
                      bounds: PrecisionBounds) -> dict[str, Any]:
    """A reduced-precision graph against the fp32 graph on the same images: the one comparison fp16 and int8 share.

    Args:
        precision: "fp16" or "int8" (names the report).
        path, fp32_path: the two graphs.
        x: verification images (N, C, H, W) float32; labels: (N,).
        fp32_logits: the fp32 graph's logits on x (N, K); ref: the unfolded head's (N, K) float64.
        per_row: compare to `ref` up to a per-row constant (euclidean ncm).
        info: the run (class counts, shot thresholds).
        bounds: what must hold.

    Returns:
        the report for model.json: agreement, Many / Medium / Few / All accuracy of both and the change
        (`compare_groups`), sizes, the bounds, "passed" and "failures" (one sentence per failed check). Raising is
        the caller's choice (int8 may retry).
    """
    import onnx

    model = onnx.load(str(path))
    io_types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    logits = _run(_session(path), x)
    diff, _, _ = _compare(logits, ref, per_row_constant=per_row)
    groups = compare_groups(logits, fp32_logits, labels, info, bounds.max_drop, bounds.min_top1_agreement)
    size, size32 = path.stat().st_size, fp32_path.stat().st_size
    failures = ["input and output must stay float32"] if io_types != {onnx.TensorProto.FLOAT} else []
    failures += groups.pop("failures")
    if bounds.max_size_ratio is not None and size / size32 > bounds.max_size_ratio:
        failures.append(f"{precision} file is {size / size32:.2f} x the fp32 size (> {bounds.max_size_ratio})")
    return {"precision": precision, "images": int(len(x)), **groups,
            "max_abs_diff_vs_unfolded": diff, "bytes_fp32": size32, "bytes": size, "size_ratio": size / size32,
            "max_size_ratio": bounds.max_size_ratio, "passed": not failures, "failures": failures}


def verify_fp16(path: Path, fp32_path: Path, x: np.ndarray, labels: np.ndarray, fp32_logits: np.ndarray,
                ref: np.ndarray, per_row: bool, info: RunInfo) -> dict[str, Any]:
    """fp16 vs fp32 (`compare_precision` with `FP16_BOUNDS`).

    Raises:
        PackageError: a check failed.
    """
    report = compare_precision("fp16", path, fp32_path, x, labels, fp32_logits, ref, per_row, info, FP16_BOUNDS)
    if not report["passed"]:
        raise PackageError(f"{path.name}: fp16 verification failed: " + "; ".join(report["failures"]))
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
    """Whether the head's folded layer equals its reference only up to a per-row constant, as its method says
    (`HeadMethod.exact`; euclidean ncm drops -||x'||^2); every other head is compared exactly."""
    return not HEADS.get(head.method).exact(head)


def verify_onnx(path: Path, head: CalibratedHead, x: np.ndarray, labels: np.ndarray, ref: np.ndarray, info: RunInfo,
                 verification: dict[str, Any]) -> np.ndarray:
    """Checker, graph structure and ONNX Runtime vs the unfolded head; fills `verification`, returns the logits."""
    import onnx

    check_model(path)
    verification["graph"] = check_head_subgraph(onnx.load(str(path)), head)
    verification["fp32"], logits = verify_fp32(path, x, ref, per_row_constant(head))
    verification["accuracy"] = group_accuracy(logits, labels, info)
    return logits
