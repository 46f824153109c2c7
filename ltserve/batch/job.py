"""A whole `ltserve predict` job: check, expand the inputs, recover an earlier run, predict the rest, summarise."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from ltserve.batch import storage
from ltserve.batch.inputs import Item, expand_inputs
from ltserve.batch.local import run_local
from ltserve.batch.options import FORMATS, PredictOptions, check_options, default_workers, resolve_format
from ltserve.batch.output import Output, Tally
from ltserve.batch.ray_engine import require_ray, run_ray
from ltserve.batch.sinks import CsvSink, JsonlSink, ParquetSink
from ltserve.errors import ConfigError
from ltserve.metrics import SHOT_GROUPS, format_percent
from ltserve.package import ModelJson, load_package
from ltserve.progress import progress_bar

logger = logging.getLogger(__name__)

ENGINES = {"local": run_local, "ray": run_ray}
"""--engine -> the function that predicts the items not done yet into the job's output."""


def _prepare_outputs(out: Path | str, errors: Path | str, fmt: str, resume: bool, overwrite: bool,
                     storage_options: dict[str, Any] | None = None) -> None:
    """Fail before any work if an output cannot be written or would overwrite a finished run by accident."""
    for path, is_dir in ((out, fmt == "parquet"), (errors, False)):
        if storage.is_url(path):  # a folder of part objects (ltserve.batch.storage)
            storage.prepare_remote_output(str(path), storage_options, resume, overwrite)
            continue
        if path.exists() and not (resume or overwrite):
            raise ConfigError(f"{path}: already exists; pass --resume to continue that run, --overwrite to replace "
                              "it, or choose another --out")
        if path.exists() and path.is_dir() != is_dir:
            raise ConfigError(f"{path}: exists and is a {'folder' if path.is_dir() else 'file'}, but the output "
                              f"must be a {'folder (parquet part files)' if is_dir else 'file'}; choose another path")
        folder = path if path.is_dir() else path.parent  # a new parquet folder is made when the job starts
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".ltserve-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"{path}: the output is not writable ({exc.strerror or exc}: {folder}); choose a "
                              "writable --out / --errors") from None
        if path.exists() and not is_dir and not os.access(path, os.W_OK):
            raise ConfigError(f"{path}: the output file is not writable; choose a writable --out / --errors")


def make_sink(fmt: str, out: Path | str, labelled: bool, part_rows: int,
              storage_options: dict[str, Any] | None = None) -> JsonlSink | CsvSink | ParquetSink | storage.PartsSink:
    if storage.is_url(out):
        return storage.PartsSink(str(out), fmt, labelled, part_rows, storage_options)
    if fmt == "jsonl":
        return JsonlSink(out)
    if fmt == "csv":
        return CsvSink(out, labelled)
    return ParquetSink(out, labelled, part_rows=part_rows)


def run_predict(opts: PredictOptions) -> dict[str, Any]:
    """Run a whole `ltserve predict` job; return its summary.

    Order: check the model package and the outputs (fail fast), expand the inputs, recover what a previous run
    wrote (--resume), predict the rest, close the writers.

    Returns:
        the summary dict (see `summarize`).

    Raises:
        PackageError: the model package is missing or invalid.
        ConfigError: bad options, unwritable or existing output, no input files.
        DataError: a malformed list file.
        KeyboardInterrupt: after Ctrl-C, once everything predicted so far is written (resume continues it).
    """
    check_options(opts)
    if opts.engine == "ray":
        require_ray()  # a missing extra fails before any work, like a missing model
    meta = load_package(opts.model)  # before anything else: a missing model fails at once
    if storage.is_url(opts.out):  # object storage: folders of part objects, the errors beside the rows
        fmt = storage.remote_format(str(opts.out), opts.format, FORMATS)
        errors_path: Path | str = opts.errors or str(opts.out).rstrip("/") + ".errors.jsonl/"
        if opts.adapt_prior:
            raise ConfigError("--adapt-prior keeps the logits in a memory map beside the output, so it needs a "
                              "local --out; write locally, then copy the file")
    else:
        fmt = resolve_format(opts.out, opts.format)
        errors_path = opts.errors or opts.out.with_name(opts.out.name + ".errors.jsonl")
    _prepare_outputs(opts.out, errors_path, fmt, opts.resume, opts.overwrite, opts.storage_options)
    items = expand_inputs(opts.inputs, meta.labels, opts.root, exclude=[opts.out, errors_path],
                          storage_options=opts.storage_options)
    labelled = any(it.label is not None for it in items)
    rows_sink = make_sink(fmt, opts.out, labelled, opts.part_rows, opts.storage_options)
    errors_sink = make_sink("jsonl", errors_path, False, opts.part_rows, opts.storage_options)
    tally = Tally(meta)
    done = _recover(rows_sink, errors_sink, tally, items) if opts.resume else set()
    todo = [it for it in items if it.key not in done]
    rows_sink.start(append=opts.resume)
    errors_sink.start(append=opts.resume)
    bar = progress_bar(total=len(items), initial=len(items) - len(todo), unit="img", desc="predict",
                       enabled=opts.progress, smoothing=0.1)
    output = Output(rows_sink, errors_sink, tally, bar)
    try:
        if todo:
            ENGINES[opts.engine](todo, opts, meta, output)
    finally:  # also on Ctrl-C: everything predicted so far is written, so --resume loses nothing
        output.close()
        bar.close()
    return summarize(opts, meta, fmt, errors_path, items, todo, output)


def _recover(rows_sink: Any, errors_sink: Any, tally: Tally,
             items: Sequence[Item]) -> set[str]:
    """Read back what an earlier run wrote (repairing torn tails); count it in `tally`; return the paths done."""
    done: set[str] = set()
    for row in rows_sink.recover():
        tally.add_row(row)
        done.add(row["path"])
    for row in errors_sink.recover():
        tally.add_error(row)
        done.add(row["path"])
    if done:
        keys = {it.key for it in items}
        stray = len(done - keys)
        logger.info("resuming: %d of %d files already done (%d rows, %d errors); %d to go", len(done) - stray,
                    len(items), tally.rows, tally.errors, len(items) - len(done) + stray)
        if stray:
            logger.warning("%d paths in the existing output are not among this run's inputs (were the inputs "
                           "changed?); they are kept and counted", stray)
    return done


def summarize(opts: PredictOptions, meta: ModelJson, fmt: str, errors_path: Path | str, items: Sequence[Item],
              todo: Sequence[Item], output: Output) -> dict[str, Any]:
    """The job summary.

    Returns:
        dict with model, engine, format, output, errors_file, files, predicted, failed (whole job, resumed rows
        included), resumed (files done by an earlier run), new_rows, new_errors, errors_by_kind, shot_groups
        (predicted rows per shot group of the predicted class), elapsed_s (this run, seconds), setup_s (model
        loading: from the start to `Output.ready`; Ray loads its actors lazily, inside the pipeline), images_per_s
        (files processed by this run per second after set-up: the pipeline's throughput), and accuracy (top1,
        balanced_accuracy, many, medium, few, n) when the inputs had labels. With --adapt-prior also prior (the
        estimate over the whole input: method, adapted, n, estimate and target per class, tv_from_target,
        expected_tv_error, shift per class) and accuracy_unadapted (the same figures before the adaptation).
    """
    t = output.tally
    processed = output.new_rows + output.new_errors
    end = output.ended or time.perf_counter()
    ready = output.ready_at or output.started
    return {
        "model": str(opts.model), "model_name": meta.name, "engine": opts.engine, "format": fmt,
        "output": str(opts.out), "errors_file": str(errors_path),
        "files": len(items), "predicted": t.rows, "failed": t.errors, "resumed": len(items) - len(todo),
        "new_rows": output.new_rows, "new_errors": output.new_errors,
        "errors_by_kind": dict(t.by_error), "shot_groups": {g: t.by_group.get(g, 0) for g in SHOT_GROUPS},
        "unknown": t.unknown, "open_set": opts.open_set,
        "batch_size": opts.batch_size, "workers": default_workers() if opts.workers is None else opts.workers,
        "elapsed_s": round(end - output.started, 3), "setup_s": round(ready - output.started, 3),
        "images_per_s": round(processed / (end - ready), 2) if processed and end > ready else None,
        "accuracy": t.accuracy(),
        **({"prior": output.prior, "accuracy_unadapted": t.accuracy(unadapted=True)} if output.prior else {}),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary printed at the end of `ltserve predict`."""
    lines = [f"{s['files']} files: {s['predicted']} predicted, {s['failed']} failed"
             + (f" ({s['resumed']} done by an earlier run)" if s["resumed"] else ""),
             f"  output: {s['output']}" + (f"; failures in {s['errors_file']}" if s["failed"] else "")]
    if s["failed"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_kind"].items())))
    lines.append("  predictions by shot group: " + ", ".join(f"{g} {s['shot_groups'][g]}" for g in SHOT_GROUPS)
                 + (f"; flagged unknown (open set): {s['unknown']}" if s.get("unknown") else ""))
    lines.append(f"  throughput: {s['images_per_s']} images/s ({s['new_rows'] + s['new_errors']} files in "
                 f"{s['elapsed_s']:.2f} s, {s['setup_s']:.2f} s of it loading the model; engine {s['engine']}, "
                 f"batch {s['batch_size']})")
    prior = s.get("prior")
    if prior:
        lines.append(_prior_line(prior))
    acc = s.get("accuracy")
    for what, a in (("", acc), (" without the adaptation", s.get("accuracy_unadapted") if prior else None)):
        if a:
            lines.append(f"  accuracy on {a['n']} labelled images{what}: top-1 {format_percent(a['top1'])} %, "
                         f"many {format_percent(a['many'])}, medium {format_percent(a['medium'])}, "
                         f"few {format_percent(a['few'])}, balanced {format_percent(a['balanced_accuracy'])}")
    return "\n".join(lines)


def _prior_line(p: dict[str, Any]) -> str:
    """The --adapt-prior lines of the summary: the estimated prior per class and whether the rows were adapted."""
    shares = ", ".join(f"{k} {v:.3f}" for k, v in p["estimate"].items())
    if not p["adapted"]:
        return f"  prior ({p['method']}): rows not adapted ({p['not_adapted']}):\n    {shares}"
    err = f", expected error {p['expected_tv_error']:.3f}" if p.get("expected_tv_error") is not None else ""
    return (f"  prior estimated over {p['n']} files ({p['method']}; {p['tv_from_target']:.3f} total variation from "
            f"the {p['target_kind']} target{err}); rows adapted to it:\n    {shares}")

