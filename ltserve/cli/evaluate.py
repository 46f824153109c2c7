"""`ltserve evaluate RUN` (every head of a run, from its feature cache) or `ltserve evaluate models/NAME --data ...`
(a model package on a data set, through the serving path: no torch). A folder holding model.json is a package.
Either writes its report as JSON with `--json PATH` (`-`: to stdout); `--out` is the package form's older name of
`--json`, accepted for one release."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ltserve.cli.common import add_alias, add_json_option, emit_json


def cli(argv: list[str] | None = None) -> int:
    """Dispatch on the first argument: a model package or a run directory."""
    argv = list(argv or [])
    if argv and not argv[0].startswith("-") and (Path(argv[0]) / "model.json").is_file():
        return package_cli(argv)
    return run_cli(argv)


def run_cli(argv: list[str]) -> int:
    """`ltserve evaluate RUN [--split val|test] [--predictions FILE] [--heads a,b] [--no-plots]`."""
    parser = argparse.ArgumentParser(
        prog="ltserve evaluate", description="Report every head of a run side by side (Many/Medium/Few/All, top-5, "
        "balanced accuracy, ECE) on cached features; writes RUN/eval/. For a model package use "
        "`ltserve evaluate models/NAME --data ...`.")
    parser.add_argument("run", metavar="RUN", help="run directory, e.g. runs/fashion_lt")
    parser.add_argument("--split", default="test", choices=("val", "test", "train"))
    parser.add_argument("--predictions", default=None, metavar="FILE",
                        help="write per-image predictions of every head (.csv or .jsonl)")
    parser.add_argument("--heads", default=None, metavar="A,B", help="only these heads (comma list)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_option(parser, "the report (every head's metrics, the files written)")
    args = parser.parse_args(argv)
    from ltserve.evaluate import evaluate_run, heads_table

    heads = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads else None
    results = evaluate_run(args.run, args.split, predictions=args.predictions, heads=heads, plots=not args.no_plots)
    if emit_json(args.json, results):
        return 0
    print(f"{results['run']}: {results['split']} ({results['n']} images)")
    print(heads_table(results["heads"]))
    for kind, path in results["files"].items():
        print(f"  {kind}: {path}")
    return 0


def _recipe_open_set(model: Path) -> str | None:
    """data.open_set of the run the package was exported from, when that run is still on disk."""
    from ltserve.errors import LtserveError
    from ltserve.package import read_model_json
    from ltserve.rundir import open_run

    run = read_model_json(model).provenance.run
    if not run or not (Path(run) / "run.json").is_file():
        return None
    try:
        return open_run(run).config.data.open_set
    except LtserveError:
        return None


def package_cli(argv: list[str]) -> int:
    """`ltserve evaluate MODEL_DIR --data ...`: Many/Medium/Few/All of a package, through ONNX Runtime."""
    parser = argparse.ArgumentParser(
        prog="ltserve evaluate", description="Evaluate a model package (model.onnx + model.json) on a data set "
        "through ONNX Runtime and the serving preprocessing: Many/Medium/Few/All, top-1, top-5.")
    parser.add_argument("model", type=Path, metavar="MODEL_DIR", help="model package folder, e.g. models/fashion-lt")
    parser.add_argument("--data", required=True, help="fashion-mnist:test | fashion-mnist:train | LIST.txt | "
                        "IMAGEFOLDER")
    parser.add_argument("--root", help="Fashion-MNIST folder, or the folder LIST paths are relative to")
    parser.add_argument("--limit", type=int, help="about N images (seeded stratified subsample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subsample")
    parser.add_argument("--batch-size", type=int, default=64, help="images per ONNX Runtime call (every size up "
                        "to it is warmed up at start)")
    parser.add_argument("--providers", help="ONNX Runtime providers, comma separated (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, help="session threads (default: all cores)")
    parser.add_argument("--open-set", metavar="PATH", help="images no class covers (a folder, or a list of paths): "
                        "report open-set rejection (AUROC, AUPR, FPR at 95%% TPR, known images rejected per shot "
                        "group, accuracy on accepted known images, OLTR's F-measure); default: the package's run's "
                        "data.open_set, when it names one")
    add_alias(parser, "--out", add_json_option(parser, "the report"))
    parser.add_argument("--predictions", type=Path, help="write per-image predictions here (.csv or .jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if not 1 <= args.batch_size <= 1024:
        parser.error("--batch-size must be in 1..1024")
    from ltserve.evaluate.package import evaluate_package, format_report
    from ltserve.evaluate.predictions import write_predictions

    report, logits, labels = evaluate_package(args.model, args.data, root=args.root, limit=args.limit,
                                              batch_size=args.batch_size, providers=args.providers,
                                              threads=args.threads, seed=args.seed, progress=not args.no_progress,
                                              open_set=args.open_set or _recipe_open_set(args.model))
    to_stdout = emit_json(args.json, report)
    if not to_stdout:
        print(format_report(report))
    if args.predictions:
        write_predictions(args.predictions, labels, logits, report["labels"])
        print(f"predictions written to {args.predictions}", file=sys.stderr if to_stdout else sys.stdout)
    return 0
