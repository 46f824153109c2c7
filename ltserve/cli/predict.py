"""`ltserve predict MODEL_DIR INPUT... --out preds.jsonl [--out-format jsonl|csv|parquet] [--top-k 5]
[--batch-size 32] [--workers W] [--root DIR] [--errors PATH] [--resume] [--engine local|ray]
[--adapt-prior [auto|em|bbse]] [--storage-option KEY=VALUE] [--json [PATH]]`: offline batch prediction (`ltserve.batch`).
Inputs and outputs may be URLs on object storage (`s3://bucket/prefix/`; `ltserve.batch.storage`). Exit 0 when every
file was predicted, 1 when any failed (listed in the errors file).

Older spellings, accepted for one release with a notice on stderr: `--model MODEL_DIR` (then every positional
argument is an input), `--summary-json PATH` (now `--json PATH`), `--format` (now `--out-format`)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from ltserve.batch.job import format_summary, run_predict
from ltserve.batch.options import ENGINES, FORMATS, PredictOptions, default_workers
from ltserve.batch.storage import is_url, parse_storage_options
from ltserve.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, add_alias, add_json_option, emit_json
from ltserve.preprocess import DEFAULT_MAX_PIXELS
from ltserve.runtime import BACKENDS
from ltserve.runtime.prior import AUTO as PRIOR_AUTO
from ltserve.runtime.prior import METHOD_CHOICES as PRIOR_METHODS


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `ltserve predict`."""
    p = argparse.ArgumentParser(
        prog="ltserve predict", description="Offline batch prediction with a model package: folders, globs or list "
        "files in; JSONL, CSV or Parquet rows out; bad files to an errors file; resumable.")
    p.add_argument("model", metavar="MODEL_DIR", help="model package folder, e.g. models/fashion-lt")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="folder (recursive), glob (quoted), image, or list file "
                   "(.txt/.lst/.list: 'path' or 'path label' per line); local, or on object storage (s3://bucket/"
                   "prefix/, with the s3 extra); one or more")
    p.add_argument("--model", dest="model_option", default=None, action=_OldModel, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, type=_path_or_url, help="output file (.jsonl, .csv), or a folder of Parquet part "
                   "files (.parquet; read as one table by pandas, pyarrow, DuckDB, Ray)")
    out_format = p.add_argument("--out-format", choices=FORMATS, help="output format (default: from the --out "
                                "suffix)")
    add_alias(p, "--format", out_format)
    p.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference call (default 32)")
    p.add_argument("--workers", type=int, help=f"decode processes (default cores - 1 = {default_workers()}; 0: "
                   "decode in the main process); ray: decode tasks (default: as CPUs allow)")
    p.add_argument("--root", help="folder that relative paths in list files are joined to (default: the list's)")
    p.add_argument("--errors", type=_path_or_url, help="errors file (default: <out>.errors.jsonl)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for s3://... inputs and outputs, repeatable (e.g. endpoint_url=http://host:9000)"
                        "; credentials come from the usual variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                        "AWS_ENDPOINT_URL, AWS_PROFILE). On object storage --out is a folder of part objects "
                        "(every --part-rows rows or 60 s), the errors a folder beside it"),
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its output files")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local process pool, or Ray Data (extra 'ray'; "
                   "the cluster at RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--threads", type=int, help="inference threads per session (default: all cores)")
    p.add_argument("--providers", help="ONNX Runtime providers, comma separated (cpu, cuda, ...)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime (default), or torch for the package's model.pt2 on a GPU machine without "
                        "onnxruntime-gpu (export with --model-format onnx,pt2); both engines, every ray actor")
    p.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="--backend torch: where model.pt2 runs (default auto: CUDA when torch sees a GPU)")
    p.add_argument("--torch-precision", choices=("auto", "fp32", "fp16"), default="auto",
                   help="--backend torch: fp32 or fp16 weights (default auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--torch-device-preprocess", action="store_true",
                   help="--backend torch: hand the runner uint8 pixels and normalise them on its device (checked "
                        "against the host path at start-up)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images (width*height)")
    p.add_argument("--part-rows", type=int, default=100_000, help="rows per Parquet part file (default 100000)")
    p.add_argument("--concurrency", type=int, default=1, help="ray: Predictor actors (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="ray: GPUs per Predictor actor (default 0)")
    p.add_argument("--ray-num-cpus", type=int, help="ray: CPUs of the local Ray instance (ignored with RAY_ADDRESS)")
    p.add_argument("--adapt-prior", nargs="?", const=PRIOR_AUTO, choices=PRIOR_METHODS, metavar="METHOD",
                   help="estimate the class prior of the whole input from its own predictions and write every row "
                        "adapted to it (logits + log(pi_input / pi_target), capped); local engine, no --resume. "
                        "METHOD: auto (the default: bbse when model.json records a usable val confusion matrix, "
                        "else em), em (EM over the posteriors) or bbse (the package's val confusion matrix)")
    p.add_argument("--open-set", choices=("off", "flag", "reject"), default=None,
                   help="open-set rejection (the package's score and per-shot-group thresholds): flag fills the "
                        "unknown and ood_score columns; reject also leaves label, class_index, probability and "
                        "shot_group empty for unknown images; off leaves both columns empty (default: flag when the "
                        "package has thresholds, else off)")
    add_alias(p, "--summary-json", add_json_option(p, "the summary (counts, rates, files)"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def cli(argv: list[str] | None = None) -> int:
    """`ltserve predict ...`: exit 0 when every file was predicted, 1 when any failed (listed in the errors file).

    A missing model, an unwritable output or bad options raise LtserveError (the dispatcher prints it, exit 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_option is not None:  # the old spelling: `--model DIR`, every positional an input
        args.inputs, args.model = [args.model, *args.inputs], args.model_option
    if not args.inputs:
        parser.error("give the model package and at least one INPUT: ltserve predict MODEL_DIR INPUT... --out PATH")
    opts = PredictOptions(
        inputs=args.inputs, model=Path(args.model), out=args.out, format=args.out_format, top_k=args.top_k,
        batch_size=args.batch_size, workers=args.workers, root=args.root, errors=args.errors, resume=args.resume,
        overwrite=args.overwrite, engine=args.engine, threads=args.threads, providers=args.providers,
        backend=args.backend,
        torch_options=torch_options(args.torch_device, args.torch_precision, args.torch_device_preprocess),
        max_pixels=args.max_pixels, part_rows=args.part_rows, concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        ray_num_cpus=args.ray_num_cpus, storage_options=parse_storage_options(args.storage_option),
        progress=not args.no_progress, adapt_prior=args.adapt_prior,
        open_set=args.open_set)
    # SIGTERM (batch schedulers, `kill`) stops like Ctrl-C: written rows are kept and --resume continues
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run_predict(opts)
    except KeyboardInterrupt:
        print(f"interrupted: rows so far are in {opts.out}; continue with the same command and --resume",
              file=sys.stderr)
        # the shell's code for SIGINT; returned, not re-raised, so the dispatcher adds no second line
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not emit_json(args.json, summary):
        print(format_summary(summary))
    return EXIT_FAILED if summary["failed"] else EXIT_OK


def torch_options(device: str, precision: str, device_preprocess: bool = False) -> dict[str, Any] | None:
    """The torch runner's options from --torch-device / --torch-precision / --torch-device-preprocess; None when all
    are left at their defaults."""
    if (device, precision, device_preprocess) == ("auto", "auto", False):
        return None
    return {"device": device, "precision": precision, **({"device_preprocess": True} if device_preprocess else {})}


def _path_or_url(text: str) -> Path | str:
    """--out / --errors: a local path, or a URL on object storage kept as text (a Path would fold its '//')."""
    return text if is_url(text) else Path(text)


class _OldModel(argparse.Action):
    """`--model DIR`, the spelling before MODEL_DIR became the first positional argument (one release)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: --model is deprecated and will be removed in the next release; give the package "
              "first: ltserve predict MODEL_DIR INPUT... --out PATH", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
