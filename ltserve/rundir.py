"""The run directory: the decoupled checkpoint that stage 1 writes and every later stage reads.

    runs/NAME/
      run.json                 RunInfo: resolved config, classes, counts, shot thresholds, data fingerprint, provenance
      backbone.safetensors     frozen representation (state dict of the backbone, no classifier)
      heads/joint.safetensors  stage-1 linear head (+ joint.json); stage 2 adds heads/<head>.*
      checkpoint/              resume state (safetensors + JSON; no pickle)
      eval/                    metrics JSON, Markdown, PNGs
      cache/                   stage-2 feature cache

No torch here: the model package and the serving side read `run.json` too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ltserve import __version__
from ltserve.errors import RunError

RUN_SCHEMA_VERSION = 1


class BackboneInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    in_chans: int
    num_features: int
    sha256: str = ""


class RunInfo(BaseModel):
    """Contents of `run.json`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RUN_SCHEMA_VERSION
    config: dict[str, Any]
    class_names: list[str]
    class_counts: list[int]
    many_threshold: int = 100
    few_threshold: int = 20
    split_sizes: dict[str, int] = {}
    data_fingerprint: str
    backbone: BackboneInfo
    ltserve_version: str = __version__
    git_commit: str | None = None
    created: str = ""
    finished: bool = False
    epochs_done: int = 0
    train_metrics: dict[str, Any] = {}


class RunPaths:
    """Named paths inside one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.run_json = self.root / "run.json"
        self.backbone = self.root / "backbone.safetensors"
        self.heads = self.root / "heads"
        self.checkpoint = self.root / "checkpoint"
        self.eval = self.root / "eval"
        self.cache = self.root / "cache"

    def make(self) -> "RunPaths":
        for d in (self.root, self.heads, self.checkpoint, self.eval, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        return self


def read_run(root: str | Path) -> RunInfo:
    """Load and validate `run.json`.

    Raises:
        RunError: the directory is not a finished-or-resumable run (names the file and the fix).
    """
    paths = RunPaths(root)
    if not paths.run_json.is_file():
        raise RunError(f"{paths.run_json}: not found; {paths.root} is not an ltserve run "
                       f"(make one with `ltserve train CONFIG.yaml --out {paths.root}`)")
    try:
        return RunInfo.model_validate_json(paths.run_json.read_text())
    except (ValidationError, ValueError) as exc:
        raise RunError(f"{paths.run_json}: invalid run.json: {exc}") from None


def write_run(root: str | Path, info: RunInfo) -> None:
    """Write `run.json` atomically."""
    atomic_write_text(RunPaths(root).run_json, info.model_dump_json(indent=2))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that a reader never sees half of it (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write with NaN written as null."""
    atomic_write_text(path, json.dumps(_nan_to_none(obj), indent=2))


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str | None:
    """The current git commit of the ltserve checkout, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def utc_now() -> str:
    """ISO-8601 UTC timestamp, seconds precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
