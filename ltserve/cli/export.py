"""`ltserve export runs/NAME --head HEAD|best --out models/NAME [--fp16] [--opset N] [--model-format onnx[,pt2]]`:
fold a head, export it, verify it and write the model package."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ltserve.errors import ConfigError
from ltserve.heads import HEADS

MIN_VERIFY_IMAGES = 8  # batch 1 and batch 7 are checked against the full batch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltserve export", description="Fold a head into one Gemm and export a verified "
                                "model package: model.onnx (+ model.pt2) and model.json.")
    p.add_argument("run_dir", type=Path, help="the run directory (runs/NAME)")
    p.add_argument("--head", required=True,
                   help=f"one of {', '.join(HEADS.names())}, or 'best' (highest val accuracy)")
    p.add_argument("--out", type=Path, default=None, help="package folder (default: models/<run name>-<head>)")
    p.add_argument("--fp16", action="store_true", help="float16 weights, float32 input and output")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 18; default: the exporter's)")
    p.add_argument("--model-format", default="onnx", help="onnx, or onnx,pt2 to also write a torch.export program")
    p.add_argument("--verify-images", type=int, default=256, help="test images the checks run on (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def cli(argv: list[str] | None = None) -> int:
    """Export and print a summary: head, precision, graph, verification, files."""
    argv = list(argv or [])
    args = _parser().parse_args(argv)
    if args.verify_images < MIN_VERIFY_IMAGES:
        raise ConfigError(f"--verify-images {args.verify_images}: use at least {MIN_VERIFY_IMAGES} (batch 1 and 7 "
                          "are checked)")
    from ltserve.evaluate import best_head
    from ltserve.export import export_package
    from ltserve.rundir import open_run

    run = open_run(args.run_dir)
    head = best_head(run) if args.head == "best" else args.head
    out = args.out or Path("models") / f"{args.run_dir.name}-{head}"
    meta = export_package(run, head, out, fp16=args.fp16, opset=args.opset, formats=args.model_format,
                          verify_images=args.verify_images, command=shlex.join(["ltserve", "export", *argv]),
                          progress=not args.no_progress)
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
