"""Model-only latency and throughput: PyTorch vs ONNX Runtime, joint vs folded head, CPU and GPU.

    python -m benchmarks.model_latency [--model runs/NAME | models/NAME] [--device cpu|cuda] [--smoke]
    python -m benchmarks.model_latency --precisions fp32,int8 --arch resnet18,resnet50 --heads joint --batches 1,8

What is timed: one call of a runtime on a preprocessed float32 NCHW batch that is already in host memory, until the
float32 logits are back in host memory (no decoding, no HTTP). Per batch size, every (model, runtime) cell is warmed
up, then the cells are run in interleaved rounds (the order rotates every round), so that machine noise falls on all
of them alike; p50/p90/p99 come from the per-call wall times, throughput = batch / mean latency.

Models:
- the demo model: `--model` (a model package folder or a run directory; a run is exported first), or, without it,
  a model trained from configs/tiny.yaml (`--smoke`: an untrained synthetic one);
- ResNet-50 at 224 px with 1000 classes and random weights, exported twice: with its joint head and with a folded
  head (tau_norm of that head, tau = 0.7), to show what folding costs (expected: nothing; same node count).
  The run directory is synthetic (backbone + run.json + heads, as stage 1 and 2 write them) and goes through the
  product's exporter, `ltserve.export.export_package`, so the benchmark measures exactly what users serve.

`--precisions fp32,int8` also exports every package as int8 (`ltserve export --precision int8`, calibrated on
the run's training images; the big models' runs record the data set their config names, Fashion-MNIST, so
calibration and verification use its images, upscaled: the weights are random, so this measures speed, not
accuracy) and measures it with ONNX Runtime CPU beside fp32 and PyTorch eager, in the same interleaved rounds.
`--arch` takes several backbones (e.g. resnet18,resnet50).

Runtimes: on CPU, PyTorch eager (the product's folded module `ltserve.export.fold.FoldedClassifier`, or the
package's model.pt2 run eagerly) and ONNX Runtime CPU (the product's `OnnxRunner`), both with threads = cores. With
`--device cuda` also the torch backend (`ltserve.runtime.torch_runner.TorchRunner`) fp32/fp16, each with and without
CUDA graphs, and ONNX Runtime CUDA / TensorRT when the installed onnxruntime has them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import add_common_args, markdown_table, output_dir, percentiles, write_results

NAME = "model_latency"
REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.model_latency")

CPU_BATCHES = (1, 8, 32, 128)
GPU_BATCHES = (1, 8, 32, 128, 256)
FOLD_TAU = 0.7
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# Model packages
# ---------------------------------------------------------------------------------------------------------------


def run_module(run_dir: Path, head_name: str) -> Any:
    """The eager PyTorch model of one head of a run: the exporter's own folded module, in eval mode."""
    from ltserve.export.fold import FoldedClassifier
    from ltserve.features.backbones import load_run_backbone
    from ltserve.rundir import open_run

    run = open_run(run_dir)
    return FoldedClassifier(load_run_backbone(run), run.head(head_name)).eval()


def synthetic_run(out: Path, arch: str, size: int, num_classes: int, channels: int = 3, seed: int = 0,
                  heads: Sequence[str] = ("joint", "tau_norm")) -> Path:
    """A run directory with random weights, as stage 1 + stage 2 would write it (no data needed).

    The joint head's row norms fall with a long-tailed class count (as trained heads' do), so tau_norm changes it.

    Args:
        out: run directory to create.
        arch: backbone name for `ltserve.features.backbones.create_backbone` (e.g. resnet50).
        size: input crop in pixels (resize = size * 8 / 7).
        num_classes: classes of the head.
        heads: heads to write; joint, tau_norm (tau = 0.7) and lws (random scales) are known.

    Returns:
        `out`.
    """
    import torch
    from safetensors.torch import save_file

    from ltserve.config import Config
    from ltserve.data import longtail_counts
    from ltserve.features.backbones import create_backbone
    from ltserve.fileio import sha256_file
    from ltserve.heads import CalibratedHead, save_head
    from ltserve.heads.tau_norm import tau_normalise
    from ltserve.rundir import BackboneInfo, RunInfo, RunPaths, utc_now, write_run

    paths = RunPaths(out).make()
    torch.manual_seed(seed)
    backbone = create_backbone(arch, in_chans=channels).eval()
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(paths.backbone))
    rng = np.random.default_rng(seed)
    counts = longtail_counts(1280, 256.0, num_classes) if num_classes > 1 else [100]
    d = int(backbone.num_features)
    norms = 0.5 + 0.5 * (np.log(counts) / np.log(max(counts)))  # head classes get larger rows
    weight = rng.normal(0, 1, (num_classes, d)).astype(np.float32)
    weight *= (norms / np.linalg.norm(weight, axis=1))[:, None]
    bias = rng.normal(0, 0.05, num_classes).astype(np.float32)
    made = {"joint": CalibratedHead(weight, bias, "joint", meta={"synthetic": True})}
    if "tau_norm" in heads:
        w, b = tau_normalise(weight, bias, FOLD_TAU)
        made["tau_norm"] = CalibratedHead(w, b, "tau_norm", meta={"tau": FOLD_TAU, "keep_bias": False,
                                                                    "synthetic": True})
    if "lws" in heads:
        scales = np.exp(rng.normal(0, 0.1, num_classes)).astype(np.float32)
        made["lws"] = CalibratedHead(weight * scales[:, None], bias * scales, "lws", meta={"synthetic": True},
                                     extras={"scales": scales})
    for name in heads:
        save_head(made[name], paths.heads)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    cfg = Config(name=f"synthetic-{arch}", model={"backbone": arch},
                 preprocess={"resize": max(size, size * 8 // 7), "crop": size, "mean": mean, "std": std,
                             "channels": channels})
    write_run(paths.root, RunInfo(
        config=cfg.model_dump(mode="json"), class_names=[f"class_{i:04d}" for i in range(num_classes)],
        class_counts=[int(c) for c in counts], data_fingerprint=_data_fingerprint(cfg),
        backbone=BackboneInfo(name=arch, in_chans=channels, num_features=d, sha256=sha256_file(paths.backbone)),
        created=utc_now(), finished=True))
    return paths.root


def _data_fingerprint(cfg: Any) -> str:
    """The fingerprint of the data set the config names (what stage 1 would record), so that int8 export can
    calibrate on its training images; "synthetic-random-weights" when that data set is not on this machine."""
    from ltserve.errors import DataError
    from ltserve.features.cache import splits_for

    try:
        return splits_for(cfg.data).fingerprint
    except (DataError, OSError) as exc:
        log.warning("no data set for the synthetic run's config (%s): int8 export will not calibrate", exc)
        return "synthetic-random-weights"


INT8_CALIBRATION_IMAGES = 64
"""Calibration images of the benchmarks' int8 exports (random weights: the ranges, not accuracy, matter here)."""


def export_heads(run_dir: Path, heads: Sequence[str], out_root: Path, prefix: str,
                 formats: Sequence[str] = ("onnx", "pt2"), verify_images: int = 32,
                 precision: str = "fp32") -> tuple[dict[str, Path], str]:
    """Export heads of a run into `out_root/<prefix>-<head>` (int8: `<prefix>-<head>-int8`) with
    `ltserve.export.export_package` (packages already there, with the formats and precision asked for, are reused).

    Returns:
        ({head: package folder}, "ltserve.export" or "ltserve.export, reused").
    """
    from ltserve.export import Int8Options, export_package

    suffix = "" if precision == "fp32" else f"-{precision}"
    outs = {h: out_root / f"{prefix}-{h}{suffix}" for h in heads}
    if all(_is_package(out, formats, precision) for out in outs.values()):  # built earlier into the same --work
        log.info("reusing the packages in %s", out_root)
        return outs, "ltserve.export, reused (built before measuring)"
    for head, out in outs.items():
        export_package(run_dir, head, out, precision=precision, formats=tuple(formats), verify_images=verify_images,
                       int8=Int8Options(calibration_images=INT8_CALIBRATION_IMAGES),
                       command="python -m benchmarks.model_latency", progress=False)
    return outs, "ltserve.export"


def _is_package(path: Path, formats: Sequence[str], precision: str = "fp32") -> bool:
    from ltserve.errors import PackageError
    from ltserve.package import load_package

    try:
        meta = load_package(path, verify=False)
    except PackageError:
        return False
    return all(f"model.{f}" in meta.files for f in formats) and meta.graph.precision == precision


# ---------------------------------------------------------------------------------------------------------------
# Runtimes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (model, runtime) pair: `fn(batch) -> logits`, plus what to report about it."""

    model: str
    head: str
    backend: str
    fn: Callable[[np.ndarray], np.ndarray]
    device: str = "cpu"
    runner: Any = None
    samples: list[float] = field(default_factory=list)
    error: str | None = None


def ort_runner(entry: "ModelEntry", providers: Sequence[str], threads: int, max_batch: int,
               provider_options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The product's ONNX Runtime runner (the Predictor's session settings) on one package.

    Raises:
        RuntimeError: ONNX Runtime fell back from the provider asked for (a mislabelled row would mislead).
    """
    from ltserve.package import load_package
    from ltserve.runtime.onnx_runner import OnnxRunner

    runner = OnnxRunner(entry.package, load_package(entry.package), providers=list(providers), threads=threads,
                        max_batch_size=max_batch, provider_options=provider_options)
    wanted = runner.requested_providers[0]
    if runner.providers[0] != wanted:
        raise RuntimeError(f"asked for {wanted}, ONNX Runtime runs on {runner.providers[0]}")
    return runner


def eager_fn(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return fn


@dataclass
class ModelEntry:
    """A model to measure: its package, and (where known) the run it came from."""

    model: str
    head: str
    package: Path
    run_dir: Path | None = None
    exported_by: str = ""
    precision: str = "fp32"


def cpu_cells(entry: ModelEntry, threads: int) -> list[Cell]:
    """PyTorch eager CPU and ONNX Runtime CPU for one package (an int8 package: ONNX Runtime only, as
    "onnxruntime-cpu-int8")."""
    import torch

    torch.set_num_threads(threads)
    runner = ort_runner(entry, ["CPUExecutionProvider"], threads, max_batch=4096)
    if entry.precision != "fp32":
        return [Cell(entry.model, entry.head, f"onnxruntime-cpu-{entry.precision}", runner.run, runner=runner)]
    cells = [Cell(entry.model, entry.head, "onnxruntime-cpu", runner.run, runner=runner)]
    if entry.run_dir is not None:
        module = run_module(entry.run_dir, entry.head)
        cells.insert(0, Cell(entry.model, entry.head, "pytorch-eager-cpu", eager_fn(module)))
    elif (entry.package / "model.pt2").is_file():
        from ltserve.runtime.torch_runner import TorchRunner

        runner = TorchRunner(entry.package, device="cpu", max_batch_size=4096)
        cells.insert(0, Cell(entry.model, entry.head, "pytorch-eager-cpu", runner.run, runner=runner))
    else:
        log.warning("%s: no run directory and no model.pt2: PyTorch eager CPU not measured", entry.package)
    return cells


def gpu_cells(entry: ModelEntry, max_batch: int, variants: Sequence[str], threads: int) -> list[Cell]:
    """The torch backend on CUDA (each variant) and ONNX Runtime CUDA / TensorRT where installed."""
    from ltserve.runtime.torch_runner import TorchRunner

    cells = []
    for variant in variants:  # e.g. fp16-graphs, fp32, fp16-compile
        precision = "fp16" if variant.startswith("fp16") else "fp32"
        try:
            runner = TorchRunner(entry.package, device="cuda", precision=precision, max_batch_size=max_batch,
                                 cuda_graphs="graphs" in variant, compile="compile" in variant)
        except Exception as exc:
            log.error("torch backend %s on %s failed to load: %s", variant, entry.package, exc)
            continue
        cells.append(Cell(entry.model, entry.head, f"torch-cuda-{variant}", runner.run, device="cuda", runner=runner))
    try:
        import onnxruntime as ort

        available = ort.get_available_providers()
    except ImportError:
        available = []
    for provider, label in (("CUDAExecutionProvider", "onnxruntime-cuda"),
                            ("TensorrtExecutionProvider", "onnxruntime-tensorrt")):
        if provider not in available:
            continue
        try:
            opts: dict[str, dict[str, Any]] = {}
            if provider == "TensorrtExecutionProvider":
                cache = Path(tempfile.gettempdir()) / "ltserve-trt-cache"
                opts = {provider: {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                   "trt_engine_cache_path": str(cache)}}
            runner = ort_runner(entry, [provider], threads, max_batch, opts)
            cells.append(Cell(entry.model, entry.head, label, runner.run, device="cuda", runner=runner))
        except Exception as exc:
            log.error("%s on %s failed: %s", label, entry.package, exc)
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def measure(cells: Sequence[Cell], x: np.ndarray, seconds: float, min_iters: int, max_iters: int,
            warmup: int) -> None:
    """Warm every cell, then run them in interleaved rounds; per-call wall times (ms) land in `cell.samples`.

    Each cell gets about `seconds` of measured time (at least `min_iters`, at most `max_iters` calls), spread over
    ~5 rounds whose order rotates, so slow drifts of the machine hit every cell alike.
    """
    for cell in cells:
        cell.samples = []
        try:
            for _ in range(warmup):
                t0 = time.perf_counter()
                cell.fn(x)
                if time.perf_counter() - t0 > seconds:  # a call longer than the cell's budget: warm enough
                    break
        except Exception as exc:  # one broken runtime must not cost the other rows
            log.exception("%s/%s failed at batch %d", cell.backend, cell.head, len(x))
            cell.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    cells = [c for c in cells if c.error is None]
    rounds = 5
    block = seconds / rounds
    r = 0
    while True:
        todo = [c for c in cells if len(c.samples) < max_iters
                and (len(c.samples) < min_iters or sum(c.samples) / 1e3 < seconds)]
        if not todo:
            break
        order = todo[r % len(todo):] + todo[:r % len(todo)]
        for cell in order:
            start_block = time.perf_counter()
            while len(cell.samples) < max_iters:
                t0 = time.perf_counter()
                cell.fn(x)
                cell.samples.append((time.perf_counter() - t0) * 1e3)
                if time.perf_counter() - start_block >= block and len(cell.samples) >= min(min_iters, r + 1):
                    break
        r += 1


def agree(cells: Sequence[Cell], x: np.ndarray) -> dict[int, dict[str, float]]:
    """Each cell's logits on `x` against ONNX Runtime CPU on the same package (else the first cell of the head):
    max |difference| relative to the largest reference logit, and top-1 agreement. Keyed by id(cell)."""
    out: dict[int, dict[str, Any]] = {}
    refs: dict[str, tuple[str, np.ndarray]] = {}
    for c in sorted(cells, key=lambda c: c.backend != "onnxruntime-cpu"):
        logits = np.asarray(c.fn(x), dtype=np.float64)
        if c.head not in refs:  # the reference itself: nothing to compare
            refs[c.head] = (c.backend, logits)
            out[id(c)] = {"vs": "(reference)", "rel_diff": None, "top1_agree": None}
            continue
        ref_name, ref = refs[c.head]
        scale = max(1e-12, float(np.abs(ref).max()))
        out[id(c)] = {"vs": ref_name, "rel_diff": float(np.abs(logits - ref).max()) / scale,
                      "top1_agree": float((logits.argmax(1) == ref.argmax(1)).mean())}
    return out


def row_of(cell: Cell, batch: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    stats = percentiles(cell.samples)
    return {"model": cell.model, "head": cell.head, "backend": cell.backend, "device": cell.device, "batch": batch,
            "iters": len(cell.samples), "p50_ms": stats["p50"], "p90_ms": stats["p90"], "p99_ms": stats["p99"],
            "mean_ms": stats["mean"], "img_per_s": batch / stats["mean"] * 1e3 if cell.samples else None,
            **(extra or {})}


def device_only_ms(cell: Cell, batch: int, iters: int) -> float | None:
    """p50 of the GPU time of one call with the input already on the device (CUDA events), for torch cells."""
    runner = cell.runner
    if runner is None or cell.device != "cuda" or not hasattr(runner, "device_latency_ms"):
        return None
    try:
        return float(np.median(runner.device_latency_ms(batch, iters)))
    except Exception as exc:
        log.warning("device-only timing of %s failed: %s", cell.backend, exc)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Goals and report
# ---------------------------------------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def fold_ratios(rows: list[dict[str, Any]], model: str, joint: str, folded: str) -> list[dict[str, Any]]:
    """p50 latency ratio folded / joint for every (backend, batch) measured for both heads."""
    out = []
    for r in rows:
        if r["model"] != model or r["head"] != folded:
            continue
        j = _find(rows, model=model, head=joint, backend=r["backend"], batch=r["batch"])
        if j and j["p50_ms"] and r["p50_ms"]:
            # noise: the spread of each cell's own samples (p90/p50) bounds what a ratio can resolve
            noise = max(j["p90_ms"] / j["p50_ms"], r["p90_ms"] / r["p50_ms"]) - 1.0
            out.append({"backend": r["backend"], "batch": r["batch"], "ratio": r["p50_ms"] / j["p50_ms"],
                        "noise": noise})
    return out


def goals(rows: list[dict[str, Any]], nodes: dict[str, dict[str, Any]], r50: str | None, demo: str | None,
          device: str, gpu: str | None) -> list[dict[str, Any]]:
    """The issue's goals with what was measured and whether each is met."""
    out: list[dict[str, Any]] = []
    if r50:
        ratios = fold_ratios(rows, r50, "joint", "tau_norm")
        if ratios:
            worst = max(ratios, key=lambda q: abs(q["ratio"] - 1.0))
            within = all(abs(q["ratio"] - 1.0) <= max(0.05, q["noise"]) for q in ratios)
            out.append({"goal": f"{r50}: folded (tau_norm) / joint p50 latency = 1.00 within noise",
                        "target": "1.00 +- max(5 %, p90/p50 spread)",
                        "measured": f"median {np.median([q['ratio'] for q in ratios]):.3f}, worst "
                                    f"{worst['ratio']:.3f} ({worst['backend']} b{worst['batch']})",
                        "met": within})
        j, f = nodes.get(f"{r50}/joint"), nodes.get(f"{r50}/tau_norm")
        if j and f:
            out.append({"goal": f"{r50}: identical ONNX node count, folded vs joint", "target": "equal",
                        "measured": f"{f['nodes']} vs {j['nodes']}", "met": f["nodes"] == j["nodes"]
                        and f["op_counts"] == j["op_counts"]})
    if r50:
        out += int8_goals(rows, r50)
    for model in [m for m in (demo, r50) if m]:
        ort1 = _find(rows, model=model, head=_first_head(rows, model), backend="onnxruntime-cpu", batch=1)
        pt1 = _find(rows, model=model, head=_first_head(rows, model), backend="pytorch-eager-cpu", batch=1)
        if ort1 and pt1:
            speed = pt1["p50_ms"] / ort1["p50_ms"]
            out.append({"goal": f"{model}: ONNX Runtime CPU vs PyTorch eager CPU at batch 1", "target": ">= 2.0x",
                        "measured": f"{speed:.2f}x ({ort1['p50_ms']:.2f} vs {pt1['p50_ms']:.2f} ms p50)",
                        "met": speed >= 2.0})
    if device == "cuda" and r50:
        fp16 = [r for r in rows
                if r["model"] == r50 and r["head"] == "joint" and r["backend"].startswith("torch-cuda-fp16")]
        b256 = [r for r in fp16 if r["batch"] == max(r["batch"] for r in fp16)] if fp16 else []
        if b256:
            best = max(b256, key=lambda r: r["img_per_s"])
            out.append({"goal": f"{r50} fp16 model-only throughput at batch {best['batch']} ({gpu})",
                        "target": ">= 15,000 img/s (H100)",
                        "measured": f"{best['img_per_s']:,.0f} img/s ({best['backend']}, host to host)"
                                    + (f"; {best['batch'] / best['device_ms'] * 1e3:,.0f} img/s on device"
                                       if best.get("device_ms") else ""),
                        "met": best["img_per_s"] >= 15000})
        b1 = [r for r in fp16 if r["batch"] == 1]
        if b1:
            best = min(b1, key=lambda r: r["p50_ms"])
            out.append({"goal": f"{r50} fp16 batch-1 p50 latency ({gpu})", "target": "< 2 ms (H100)",
                        "measured": f"{best['p50_ms']:.3f} ms ({best['backend']}, host to host)",
                        "met": best["p50_ms"] < 2.0})
    return out


INT8_BACKEND = "onnxruntime-cpu-int8"


def int8_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, head, batch) with an int8 row: p50 of ONNX Runtime fp32 and int8 and of PyTorch eager, the
    int8 speed-ups over each (ratios of p50 latency, measured in the same interleaved rounds), and the int8 top-1
    agreement with fp32 on that batch."""
    out = []
    for r in rows:
        if r["backend"] != INT8_BACKEND:
            continue
        key = {"model": r["model"], "head": r["head"], "batch": r["batch"]}
        fp32, eager = _find(rows, backend="onnxruntime-cpu", **key), _find(rows, backend="pytorch-eager-cpu", **key)
        out.append({**key, "int8_p50_ms": r["p50_ms"], "fp32_p50_ms": fp32["p50_ms"] if fp32 else None,
                    "eager_p50_ms": eager["p50_ms"] if eager else None,
                    "vs_fp32": fp32["p50_ms"] / r["p50_ms"] if fp32 else None,
                    "vs_eager": eager["p50_ms"] / r["p50_ms"] if eager else None,
                    "top1_agree_fp32": r.get("top1_agree")})
    return out


def int8_goals(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The int8 goals on the big model: >= 2.0x ONNX Runtime fp32 at batch 8, >= 3.0x PyTorch eager at batch 1."""
    ratios = {q["batch"]: q for q in int8_ratios(rows) if q["model"] == model and q["head"] == _first_head(rows, model)}
    out = []
    for batch, ref, key, target in ((8, "ONNX Runtime fp32", "vs_fp32", 2.0), (1, "PyTorch eager", "vs_eager", 3.0)):
        q = ratios.get(batch)
        if q is None or q[key] is None:
            continue
        other = q["fp32_p50_ms"] if key == "vs_fp32" else q["eager_p50_ms"]
        out.append({"goal": f"{model}: ONNX Runtime int8 vs {ref} at batch {batch} (CPU)", "target": f">= {target}x",
                    "measured": f"{q[key]:.2f}x ({q['int8_p50_ms']:.2f} vs {other:.2f} ms p50)",
                    "met": q[key] >= target})
    return out


def _first_head(rows: list[dict[str, Any]], model: str) -> str:
    heads = [r["head"] for r in rows if r["model"] == model]
    return "joint" if "joint" in heads else (heads[0] if heads else "")


def report_md(rows: list[dict[str, Any]], nodes: dict[str, dict[str, Any]], goal_rows: list[dict[str, Any]],
              ratios: list[dict[str, Any]], notes: str) -> str:
    cols = ["model", "head", "backend", "batch", "p50_ms", "p90_ms", "p99_ms", "img_per_s", "iters", "vs", "rel_diff",
            "top1_agree"]
    if any(r.get("device_ms") for r in rows):
        cols.insert(7, "device_ms")
    parts = ["## Goals", markdown_table([{**g, "met": "yes" if g["met"] else "NO"} for g in goal_rows],
                                        ["goal", "target", "measured", "met"]),
             "## Latency (ms) and throughput (img/s)", markdown_table([_display(r) for r in rows], cols)]
    if ratios:
        parts += ["## Folded / joint p50 ratio", markdown_table(ratios, ["backend", "batch", "ratio", "noise"],
                                                                floatfmt="{:.3f}")]
    speedups = int8_ratios(rows)
    if speedups:
        parts += ["## int8 speed-up (p50 latency ratios, same rounds)",
                  markdown_table(speedups, ["model", "head", "batch", "fp32_p50_ms", "int8_p50_ms", "vs_fp32",
                                            "eager_p50_ms", "vs_eager", "top1_agree_fp32"])]
    parts += ["## ONNX graphs", markdown_table([{"package": k, **v, "op_counts": ", ".join(
        f"{op} {n}" for op, n in v["op_counts"].items())} for k, v in nodes.items()],
        ["package", "opset", "nodes", "op_counts"])]
    if notes:
        parts.append(notes)
    return "\n\n".join(parts)


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """A row with numbers as text: 3 significant digits below 100, thousands separators above, diffs as 1e-6."""
    def fmt(key: str, v: Any) -> Any:
        if not isinstance(v, float) or v != v:
            return v
        if key == "rel_diff":
            return f"{v:.1e}"
        if key == "top1_agree":
            return f"{v:.3f}"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

    return {k: fmt(k, v) for k, v in row.items()}


def plot(rows: list[dict[str, Any]]) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        models = sorted({r["model"] for r in rows})
        fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
        for i, model in enumerate(models):
            series = sorted({(r["head"], r["backend"]) for r in rows if r["model"] == model})
            for head, backend in series:
                pts = sorted((r["batch"], r["p50_ms"], r["img_per_s"]) for r in rows
                             if r["model"] == model and r["head"] == head and r["backend"] == backend)
                b, p50, thr = zip(*pts)
                style = "--" if head != "joint" else "-"
                axes[i][0].plot(b, p50, style, marker="o", label=f"{backend} ({head})")
                axes[i][1].plot(b, thr, style, marker="o", label=f"{backend} ({head})")
            for ax, ylabel in zip(axes[i], ("p50 latency (ms)", "throughput (img/s)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("batch size")
                ax.set_ylabel(ylabel)
                ax.set_title(model)
                ax.grid(True, which="both", alpha=0.3)
            axes[i][1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, NAME)
    parser.add_argument("--model", type=Path, default=None,
                        help="the demo model: a package folder or a run directory (default: train configs/tiny.yaml)")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo model")
    parser.add_argument("--no-resnet50", action="store_true", help="skip the ResNet-50 packages")
    parser.add_argument("--arch", default="resnet50",
                        help="the big models' backbones, comma-separated (default resnet50; e.g. resnet18,resnet50)")
    parser.add_argument("--heads", default="joint,tau_norm",
                        help="heads of the big models (default joint,tau_norm: the fold comparison)")
    parser.add_argument("--precisions", default="fp32",
                        help="fp32, or fp32,int8: also export every package as int8 and measure it (ONNX Runtime CPU)")
    parser.add_argument("--size", type=int, default=224, help="the big model's input size in px")
    parser.add_argument("--classes", type=int, default=1000, help="the big model's classes")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,128 on CPU, "
                        "+256 on GPU)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per cell and batch size")
    parser.add_argument("--min-iters", type=int, default=None)
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for all measurements: batch sizes not started by then are skipped (and noted)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per runtime (default: all cores)")
    parser.add_argument("--cpu-max-batch", type=int, default=None,
                        help="largest batch for the CPU runtimes (default: all on --device cpu, 32 with cuda)")
    parser.add_argument("--gpu-variants", default="fp32,fp32-graphs,fp16,fp16-graphs",
                        help="torch backend variants on CUDA (fp32|fp16, -graphs, -compile)")
    parser.add_argument("--no-cpu", action="store_true", help="with --device cuda: skip the CPU runtimes")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the built packages (default: a tmp dir); packages already there are reused")
    parser.add_argument("--build-only", action="store_true", help="build the packages into --work and stop")
    return parser


def prepare_models(args: argparse.Namespace, work: Path) -> tuple[list[ModelEntry], str | None, str | None, list[str]]:
    """Build or find every package to measure. Returns (entries, the ResNet-50 (else the first big) model's name,
    demo model name, notes)."""
    notes: list[str] = []
    entries: list[ModelEntry] = []
    demo_name = r50_name = None
    precisions = precisions_of(args)
    if not args.no_demo:
        try:
            demo_entries = demo_models(args, work, precisions)
            entries += demo_entries
            demo_name = demo_entries[0].model if demo_entries else None
        except Exception as exc:
            log.exception("demo model unavailable")
            notes.append(f"Demo model not measured: {type(exc).__name__}: {exc}")
    if not args.no_resnet50:
        archs = [a for a in args.arch.split(",") if a]
        names = {arch: f"{arch}-{args.size}px-{args.classes}c" for arch in archs}
        r50_name = names.get("resnet50", names[archs[0]])
        for arch, name in names.items():
            run = work / "runs" / name
            if not (run / "run.json").is_file():
                synthetic_run(run, arch, args.size, args.classes, seed=args.seed)
            for precision in precisions:
                pkgs, how = export_heads(run, heads_of(args), work / "models", name, precision=precision,
                                         formats=("onnx", "pt2") if precision == "fp32" else ("onnx",))
                entries += [ModelEntry(name, head, pkg, run, how, precision) for head, pkg in pkgs.items()]
    return entries, r50_name, demo_name, notes


def result_name(args: argparse.Namespace) -> str:
    """"model_latency", or "model_latency_int8" with int8 packages: an int8 comparison is its own results folder
    (benchmarks/results/<machine>/model_latency_int8/), beside the fp32 runtime comparison, not in place of it."""
    return NAME + ("_int8" if "int8" in precisions_of(args) else "")


def precisions_of(args: argparse.Namespace) -> list[str]:
    """--precisions as a list, fp32 first (the reference of every comparison)."""
    items = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in items if p not in ("fp32", "int8")]
    if unknown:
        raise SystemExit(f"--precisions {args.precisions}: {', '.join(unknown)} not one of fp32, int8")
    return ["fp32", *[p for p in items if p != "fp32"]]


def heads_of(args: argparse.Namespace) -> list[str]:
    return [h.strip() for h in args.heads.split(",") if h.strip()]


def demo_models(args: argparse.Namespace, work: Path, precisions: Sequence[str] = ("fp32",)) -> list[ModelEntry]:
    """The demo model as a package (+ its run when known), and its int8 package when asked for (a run only)."""
    path = args.model
    if path is not None and (path / "model.json").is_file():
        from ltserve.package import load_package

        meta = load_package(path)
        run = Path(meta.provenance.run) if meta.provenance.run else None
        run = run if run is not None and (run / "run.json").is_file() else None
        name = f"demo {path.name} ({meta.preprocess.crop} px)"
        entries = [ModelEntry(name, meta.head.name, path, run, "given", meta.graph.precision)]
        if run is not None and "int8" in precisions and meta.graph.precision == "fp32":
            pkgs, how = export_heads(run, (meta.head.name,), work / "models", "demo", precision="int8",
                                     formats=("onnx",))
            entries.append(ModelEntry(name, meta.head.name, pkgs[meta.head.name], run, how, "int8"))
        return entries
    if path is None:
        path = work / "runs" / "demo"
        if (path / "run.json").is_file():  # built earlier (by the build step, or an earlier run into --work)
            pass
        elif args.smoke:  # seconds: an untrained CIFAR ResNet of the tiny recipe's shape
            synthetic_run(path, "resnet8_cifar", 28, 10, channels=1, seed=args.seed, heads=("joint",))
        else:
            from ltserve.config import load_config
            from ltserve.train import train

            train(load_config(REPO / "configs" / "tiny.yaml"), path, evaluate=False)
    elif not (path / "run.json").is_file():
        raise FileNotFoundError(f"--model {path}: neither a model package (model.json) nor a run (run.json)")
    from ltserve.rundir import read_run

    info = read_run(path)
    name = f"demo {info.backbone.name} {info.config['preprocess']['crop']} px"  # what the latency depends on
    entries = []
    for precision in precisions:
        pkgs, how = export_heads(path, ("joint",), work / "models", "demo", precision=precision,
                                 formats=("onnx", "pt2") if precision == "fp32" else ("onnx",))
        entries.append(ModelEntry(name, "joint", pkgs["joint"], path, how, precision))
    return entries


def entry_key(e: ModelEntry) -> str:
    """"model/head", plus "/int8" for an int8 package."""
    return f"{e.model}/{e.head}" + ("" if e.precision == "fp32" else f"/{e.precision}")


@dataclass
class Plan:
    """What one invocation measures, resolved from the arguments and the device."""

    cuda: bool
    batches: list[int]
    seconds: float
    min_iters: int
    threads: int
    cpu_max: int


def resolve_plan(args: argparse.Namespace) -> Plan:
    """Defaults by mode: smoke (tiny, 0.2 s per cell), CPU (1..128, 2 s, >= 3 calls), GPU (1..256, 1 s, >= 20)."""
    if args.smoke and args.arch == "resnet50" and args.size == 224:  # the smoke shape: seconds, not minutes
        args.arch, args.size, args.classes = "resnet10", 32, 10
    cuda = args.device.startswith("cuda")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else \
        ([1, 4] if args.smoke else list(GPU_BATCHES if cuda else CPU_BATCHES))
    return Plan(
        cuda=cuda, batches=batches,
        seconds=args.seconds if args.seconds is not None else (0.2 if args.smoke else (1.0 if cuda else 2.0)),
        min_iters=args.min_iters if args.min_iters is not None else (2 if args.smoke else (20 if cuda else 3)),
        threads=args.threads or os.cpu_count() or 1,
        cpu_max=args.cpu_max_batch if args.cpu_max_batch is not None else (32 if cuda else max(batches)))


def build_cells(entries: list[ModelEntry], plan: Plan, args: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    for e in entries:
        if not (plan.cuda and args.no_cpu):
            cells += cpu_cells(e, plan.threads)
        if plan.cuda and e.precision == "fp32":  # int8 (QDQ) is a CPU format here
            cells += gpu_cells(e, max(plan.batches), [v for v in args.gpu_variants.split(",") if v], plan.threads)
    return cells


def measure_all(cells: list[Cell], entries: list[ModelEntry], plan: Plan, args: argparse.Namespace,
                notes: list[str]) -> list[dict[str, Any]]:
    """Every batch size, every model: interleaved cells, then agreement and (GPU) device-only time per cell."""
    from ltserve.package import load_package

    specs = {e.model: load_package(e.package, verify=False).preprocess for e in entries}
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for batch in plan.batches:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            notes.append(f"Time budget ({args.time_budget:g} s) spent: batch {batch} and later not measured.")
            log.warning("time budget spent: skipping batch %d and later", batch)
            break
        for model in dict.fromkeys(c.model for c in cells):
            spec = specs[model]
            x = rng.standard_normal((batch, spec.channels, spec.crop, spec.crop), dtype=np.float32)
            group = [c for c in cells if c.model == model and (c.device == "cuda" or batch <= plan.cpu_max)]
            log.info("batch %d, %s: %s", batch, model, ", ".join(f"{c.backend}/{c.head}" for c in group))
            measure(group, x, plan.seconds, plan.min_iters, args.max_iters, warmup=1 if args.smoke else 3)
            notes += [f"{c.backend}/{c.head} failed at batch {batch}: {c.error}" for c in group if c.error]
            cells[:] = [c for c in cells if c.error is None]
            group = [c for c in group if c.error is None]
            agreement = agree(group, x)
            for c in group:
                extra = {"device_ms": device_only_ms(c, batch, 20 if args.smoke else 100)} if c.device == "cuda" else {}
                rows.append(row_of(c, batch, {**extra, **agreement.get(id(c), {})}))
    order = {c: i for i, c in enumerate(dict.fromkeys((r["model"], r["head"], r["backend"]) for r in rows))}
    return sorted(rows, key=lambda r: (order[(r["model"], r["head"], r["backend"])], r["batch"]))


def report(out: Path, rows: list[dict[str, Any]], entries: list[ModelEntry], r50: str | None, demo: str | None,
           plan: Plan, args: argparse.Namespace, notes: list[str]) -> list[dict[str, Any]]:
    """Goals, fold ratios, node counts -> results.json / .md / .png. Returns the goal rows."""
    from ltserve.package import load_package

    nodes = {entry_key(e): load_package(e.package, verify=False).graph.model_dump() for e in entries}
    gpu = _gpu_name() if plan.cuda else None
    goal_rows = goals(rows, nodes, r50, demo, "cuda" if plan.cuda else "cpu", gpu)
    ratios = fold_ratios(rows, r50, "joint", "tau_norm") if r50 else []
    exported = {entry_key(e): e.exported_by for e in entries}
    notes.append("Model-only: float32 NCHW batch in host memory -> float32 logits in host memory (GPU rows include "
                 "both copies; device_ms is the GPU time alone, input already on the device). Cells interleaved per "
                 f"batch size; {plan.seconds:g} s measured per cell (>= {plan.min_iters} calls); CPU threads = "
                 f"{plan.threads}. rel_diff: max |logit difference| / max |reference logit| against the `vs` runtime "
                 f"on the same input. Packages exported by: {', '.join(f'{k}: {v}' for k, v in exported.items())}. "
                 f"Random weights for {r50 or 'the big model'} (near-tied logits: fp16 and int8 may flip top-1s); "
                 f"the folded head is tau_norm (tau {FOLD_TAU}) of the joint head."
                 + (f" int8: `ltserve export --precision int8` (QDQ, per-channel int8 weights, uint8 activations, the "
                    f"default float nodes), calibrated on {INT8_CALIBRATION_IMAGES} training images of each run's "
                    "data set; vs_fp32 and vs_eager are p50 ratios from the same interleaved rounds."
                    if "int8" in precisions_of(args) else ""))
    config = {"batches": plan.batches, "seconds_per_cell": plan.seconds, "min_iters": plan.min_iters,
              "threads": plan.threads, "cpu_max_batch": plan.cpu_max, "device": args.device, "seed": args.seed,
              "smoke": args.smoke, "models": {entry_key(e): str(e.package) for e in entries},
              "precisions": precisions_of(args), "heads": heads_of(args), "archs": args.arch.split(","),
              "exported_by": exported, "gpu_variants": args.gpu_variants if plan.cuda else None}
    results = {"rows": rows, "nodes": nodes, "fold_ratios": ratios, "int8_ratios": int8_ratios(rows),
               "goals": goal_rows, "card": gpu}
    write_results(out, result_name(args), config, results,
                  report_md(rows, nodes, goal_rows, ratios, "\n\n".join(notes)),
                  plot(rows) if rows else None)
    return goal_rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.build_only and args.work is None:
        parser.error("--build-only needs --work (the folder the packages are built into)")
    plan = resolve_plan(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="ltserve-bench-"))
    if not args.build_only:
        build_in_child(list(sys.argv[1:] if argv is None else argv), work)
    entries, r50, demo, notes = prepare_models(args, work)
    if args.build_only:
        for e in entries:
            print(f"{e.model}/{e.head}: {e.package} ({e.exported_by})")
        return 0
    out = output_dir(args, result_name(args))
    rows = measure_all(build_cells(entries, plan, args), entries, plan, args, notes)
    goal_rows = report(out, rows, entries, r50, demo, plan, args, notes)
    print(f"{result_name(args)}: results in {out}")
    for g in goal_rows:
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']} (target {g['target']})")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def build_in_child(argv: list[str], work: Path) -> None:
    """Train and export in a child process (`--build-only`), so that this process only measures: after
    torch.export, the ONNX exporter and int8 calibration had run in the measuring process, PyTorch eager ResNet-50 at
    batch 1 measured 1,787 ms p50 against 56 ms in a process that found the packages built (2-core CPU, same run).

    Raises:
        RuntimeError: the build failed (its output is on this process's stderr).
    """
    import subprocess

    cmd = [sys.executable, "-m", "benchmarks.model_latency", *argv, "--build-only", "--work", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"building the packages failed ({' '.join(cmd[1:])}: exit {proc.returncode})")


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
