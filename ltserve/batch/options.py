"""What `ltserve predict` takes: `PredictOptions`, checked before any work, and the output format."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltserve.errors import ConfigError, unknown_choice
from ltserve.open_set import check_mode
from ltserve.preprocess import DEFAULT_MAX_PIXELS
from ltserve.runtime.prior import METHOD_CHOICES as PRIOR_METHODS

FORMATS = ("jsonl", "csv", "parquet")
ENGINES = ("local", "ray")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
                   ".pq": "parquet"}


@dataclass
class PredictOptions:
    """Everything `ltserve predict` takes (see `cli` for the meaning of each)."""

    inputs: list[str]
    model: Path
    out: Path | str  # a local path, or a URL on object storage (str: `ltserve.batch.storage`)
    format: str | None = None
    top_k: int = 5
    batch_size: int = 32
    workers: int | None = None
    root: str | None = None
    errors: Path | str | None = None
    resume: bool = False
    overwrite: bool = False
    engine: str = "local"
    threads: int | None = None
    providers: str | None = None
    backend: str = "onnxruntime"
    torch_options: dict[str, Any] | None = None  # the torch runner's device, precision, cuda_graphs, compile
    max_pixels: int = DEFAULT_MAX_PIXELS
    part_rows: int = 100_000
    chunk_size: int | None = None
    concurrency: int = 1
    num_gpus: float = 0.0
    ray_num_cpus: int | None = None
    storage_options: dict[str, Any] | None = None  # fsspec options for URLs (`--storage-option`); never logged
    progress: bool = True
    adapt_prior: str | None = None  # "auto" | "em" | "bbse": estimate the prior over the whole input, adapt each row
    open_set: str | None = None  # "off" | "flag" | "reject"; None: flag when the package has thresholds, else off


def default_workers() -> int:
    """Decode processes by default: one core is left to the inference session (at least one worker)."""
    return max(1, (os.cpu_count() or 2) - 1)


def resolve_format(out: Path, fmt: str | None) -> str:
    """--out-format, or the format the --out suffix names.

    Raises:
        ConfigError: an unknown format, or no --out-format and an unknown suffix.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(unknown_choice("--out-format", fmt, FORMATS))
        return fmt
    suffix = out.suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ConfigError(f"{out}: cannot tell the output format from the suffix {suffix or '(none)'!r}; name the file "
                          f".jsonl, .csv or .parquet, or pass --out-format {'|'.join(FORMATS)}")
    return _SUFFIX_FORMATS[suffix]


def check_options(o: PredictOptions) -> None:
    if o.engine not in ENGINES:
        raise ConfigError(unknown_choice("--engine", o.engine, ENGINES))
    for name, value in (("--batch-size", o.batch_size), ("--top-k", o.top_k), ("--part-rows", o.part_rows),
                        ("--concurrency", o.concurrency), ("--max-pixels", o.max_pixels)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if o.resume and o.overwrite:
        raise ConfigError("--resume continues the existing output and --overwrite replaces it: pass one of them")
    if o.workers is not None and o.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0 decodes in the main process), got {o.workers}")
    if o.open_set is not None:
        check_mode(o.open_set, "--open-set")
        if o.open_set == "reject" and o.adapt_prior is not None:
            raise ConfigError("--open-set reject with --adapt-prior: the adapted rows are written without the "
                              "features a feature score needs; use --open-set flag or drop --adapt-prior")
    if o.adapt_prior is not None:
        if o.adapt_prior not in PRIOR_METHODS:
            raise ConfigError(unknown_choice("--adapt-prior", o.adapt_prior, PRIOR_METHODS))
        if o.engine != "local":
            raise ConfigError("--adapt-prior runs on --engine local (the prior is estimated over every logit of the "
                              "job before any row is written); drop --engine ray or --adapt-prior")
        if o.resume:
            raise ConfigError("--adapt-prior estimates the prior over the whole input, so a run cannot be continued: "
                              "pass --overwrite instead of --resume")
    if o.torch_options and o.backend != "torch":
        raise ConfigError(f"--torch-device / --torch-precision ({o.torch_options}) set the torch backend, but "
                          f"--backend is {o.backend}; add --backend torch or drop them")

