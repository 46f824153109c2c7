"""`ltserve export runs/NAME --head HEAD|best --out models/NAME [--precision fp32|fp16|int8] [--opset N]
[--model-format onnx[,pt2]] [--jpeg-draft auto|on|off] [--bento]`: fold a head, export it, verify it and write the model
package (and, with --bento, its Bento: `ltserve bento`).

int8 calibrates on a class-balanced sample of the run's training images, compares Many / Medium / Few / All with
the fp32 graph on the test images, and refuses (exit status 3, with the per-group table) when few-shot accuracy
drops more than --int8-max-few-drop points or All more than --int8-max-all-drop points, after retrying with the
most sensitive layers kept in float (--int8-retries).

--jpeg-draft decides whether the package lets large JPEGs be decoded at reduced scale (DCT-domain downscaling, never
below the model's resize): the shipped graph runs on the verification split decoded exactly and with draft, and
draft is turned on only when no group's accuracy (Many / Medium / Few / All) drops more than --jpeg-draft-max-drop
points. auto (default): on when the check passes, off otherwise (and off when no image of the split would be decoded
differently); on: the same, but a failed check refuses the export (exit status 3, with the per-group table); off: no
check. `--json [PATH]` writes the package's model.json (`-`: to stdout in place of the summary).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ltserve.cli.common import add_json_option, emit_json
from ltserve.errors import ConfigError
from ltserve.heads import HEADS
from ltserve.package import PRECISIONS

MIN_VERIFY_IMAGES = 8  # batch 1 and batch 7 are checked against the full batch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltserve export", description="Fold a head into one Gemm and export a verified "
                                "model package: model.onnx (+ model.pt2) and model.json.")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run directory (runs/NAME)")
    p.add_argument("--head", required=True,
                   help=f"one of {', '.join(HEADS.names())}, or 'best' (highest val accuracy)")
    p.add_argument("--out", type=Path, default=None, help="package folder (default: models/<run name>-<head>)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default); fp16: float16 weights; int8: static int8 (QDQ, per-channel weights) "
                   "calibrated on training images. Input and output stay float32")
    # int8 options default to None: then `ltserve.export.Int8Options`'s defaults apply (the export package imports
    # torch, so it is imported only after parsing, and its defaults are not repeated here)
    q = p.add_argument_group("int8")
    q.add_argument("--calibration-images", type=int, default=None,
                   help="training images to calibrate on, the same number per class (default 256)")
    q.add_argument("--calibration-seed", type=int, default=None, help="seed of the calibration sample (default 0)")
    q.add_argument("--int8-max-few-drop", type=float, default=None, metavar="POINTS",
                   help="refuse when few-shot accuracy drops more than this (default 1.0 point)")
    q.add_argument("--int8-max-all-drop", type=float, default=None, metavar="POINTS",
                   help="refuse when All accuracy drops more than this (default 0.5 point)")
    q.add_argument("--int8-retries", type=int, default=None,
                   help="after a refusal, retry keeping the 1, 2, 4, 8 most sensitive layers in float as well "
                   "(default 3; 0: refuse at once)")
    q.add_argument("--keep-float", default=None, metavar="NODES",
                   help="nodes kept in float: head (the Gemm), stem (the first Conv) or ONNX node names, comma-"
                   "separated, '' for none (default head,stem: the measured choice, see ltserve.export.quantize)")
    d = p.add_argument_group("JPEG draft decoding")
    d.add_argument("--jpeg-draft", choices=("auto", "on", "off"), default="auto",
                   help="auto (default): allow draft decoding when the per-group check passes; on: refuse the export "
                   "when it does not; off: never, no check")
    d.add_argument("--jpeg-draft-max-drop", type=float, default=None, metavar="POINTS",
                   help="the largest accuracy drop allowed in any of Many, Medium, Few, All (default 0.3 point)")
    d.add_argument("--jpeg-draft-images", type=int, default=None,
                   help="verification-split images the check decodes both ways (default 2000)")
    o = p.add_argument_group("open-set rejection")
    o.add_argument("--open-set-score", default=None, metavar="NAME",
                   help="the score unknown images are rejected on: msp, energy, max_logit, ncm_cosine, mahalanobis "
                   "(default: the export rule, ltserve.open_set.choose_score: mahalanobis when the graph has "
                   "features)")
    o.add_argument("--open-set-target", type=float, default=0.95, metavar="SHARE",
                   help="share of known val images accepted in every shot group (default 0.95)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 18; default: the exporter's)")
    p.add_argument("--model-format", default="onnx", help="onnx, or onnx,pt2 to also write a torch.export program")
    p.add_argument("--verify-images", type=int, default=None,
                   help="test images the checks run on (default 256; int8: 2000)")
    p.add_argument("--bento", action="store_true", help="also build the package's Bento (as `ltserve bento OUT`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_option(p, "the written package's model.json")
    return p


def cli(argv: list[str] | None = None) -> int:
    """Export and print a summary: head, precision, graph, verification, files."""
    argv = list(argv or [])
    args = _parser().parse_args(argv)
    if args.verify_images is not None and args.verify_images < MIN_VERIFY_IMAGES:
        raise ConfigError(f"--verify-images {args.verify_images}: use at least {MIN_VERIFY_IMAGES} (batch 1 and 7 "
                          "are checked)")
    if args.open_set_score is not None:
        from ltserve.open_set import check_score

        check_score(args.open_set_score)  # before torch is imported and the run is read
    from ltserve.evaluate import best_head
    from ltserve.export import Int8Options, JpegDraftOptions, export_package
    from ltserve.rundir import open_run

    given = {"calibration_images": args.calibration_images, "seed": args.calibration_seed,
             "max_few_drop": None if args.int8_max_few_drop is None else args.int8_max_few_drop / 100.0,
             "max_all_drop": None if args.int8_max_all_drop is None else args.int8_max_all_drop / 100.0,
             "retries": args.int8_retries,
             "keep_float": None if args.keep_float is None else tuple(
                 n.strip() for n in args.keep_float.split(",") if n.strip())}
    int8 = Int8Options(**{k: v for k, v in given.items() if v is not None})
    draft_given = {"max_drop": None if args.jpeg_draft_max_drop is None else args.jpeg_draft_max_drop / 100.0,
                   "images": args.jpeg_draft_images}
    draft = JpegDraftOptions(mode=args.jpeg_draft, **{k: v for k, v in draft_given.items() if v is not None})

    run = open_run(args.run_dir)
    head = best_head(run) if args.head == "best" else args.head
    out = args.out or Path("models") / f"{args.run_dir.name}-{head}"
    meta = export_package(run, head, out, precision=args.precision, opset=args.opset, formats=args.model_format,
                          verify_images=args.verify_images, int8=int8, jpeg_draft=draft,
                          command=shlex.join(["ltserve", "export", *argv]), progress=not args.no_progress,
                          open_set_score=args.open_set_score, open_set_target=args.open_set_target)
    from ltserve.cli.inspect import draft_lines, open_set_lines, precision_lines

    if emit_json(args.json, meta.model_dump(mode="json")):
        return 0
    v = meta.verification
    size = sum(f.bytes for f in meta.files.values())
    print(f"{out}: head {head} (T={meta.head.temperature:.3g}), {meta.graph.precision}, opset {meta.graph.opset}, "
          f"{meta.graph.nodes} nodes, {size / 1e6:.2f} MB")
    print(f"  verified on {v['inputs']['images']} {v['inputs']['split']} images: max |diff| "
          f"{v['fp32']['max_abs_diff']:.2g} (tol {v['fp32']['tolerance']:.2g}), top-1 agreement "
          f"{v['fp32']['top1_agreement']:.4f}")
    for line in [*precision_lines(v), *draft_lines(meta), *open_set_lines(meta)]:
        print("  " + line)
    for name, entry in meta.files.items():
        print(f"  {name}  {entry.bytes} bytes  sha256 {entry.sha256[:16]}...")
    if args.bento:
        from ltserve.cli.bento import build_bento

        tag, built = build_bento(out)
        print(f"  Bento {tag} ({'built' if built else 'already in the store'}): bentoml serve {tag}")
    return 0

