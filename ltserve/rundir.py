"""The run directory: the decoupled checkpoint that stage 1 writes and every later stage reads.

    runs/NAME/
      run.json                 RunInfo: resolved config, classes, counts, shot thresholds, data fingerprint, provenance
      backbone.safetensors     frozen representation (state dict of the backbone, no classifier)
      heads/joint.safetensors  stage-1 linear head (+ joint.json); stage 2 adds heads/<head>.*
      checkpoint/              resume state (safetensors + JSON; no pickle)
      eval/                    metrics JSON, Markdown, PNGs
      cache/                   stage-2 feature cache

A stage receives a `Run`: the paths, `run.json` and the validated config, read once (`open_run`), and passes it on
instead of a path to parse again. No torch here: the model package and the serving side read `run.json` too.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ltserve import __version__
from ltserve.config import Config, config_from_dict
from ltserve.errors import RunError
from ltserve.fileio import atomic_write_text
from ltserve.heads import CalibratedHead, list_heads, load_head

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


@dataclass
class Run:
    """A run directory read once: its paths, `run.json` and the validated config.

    Stages take a `Run` (or a path, which they open once) and pass it on. Heads are read from `heads/` when asked
    for and kept, so a process loads each head file once.
    """

    paths: RunPaths
    info: RunInfo
    config: Config
    _heads: dict[str, CalibratedHead] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        return self.paths.root

    def head_names(self) -> list[str]:
        """Registered heads present in `heads/`, in registry order."""
        return list_heads(self.paths.heads)

    def head(self, name: str) -> CalibratedHead:
        """Head `name` from `heads/` (read on first use).

        Raises:
            RunError: the head files are missing or unreadable.
        """
        if name not in self._heads:
            self._heads[name] = load_head(self.paths.heads, name)
        return self._heads[name]

    def forget_heads(self) -> None:
        """Drop the heads read so far (after a stage wrote new ones)."""
        self._heads.clear()


def open_run(run: "Run | str | Path") -> Run:
    """A `Run` as is, or the run directory at a path, read and validated.

    Raises:
        RunError: not a run directory, or an invalid run.json (names the file and the fix).
        ConfigError: the config saved in run.json no longer validates.
    """
    if isinstance(run, Run):
        return run
    info = read_run(run)
    paths = RunPaths(run)
    return Run(paths, info, config_from_dict(info.config, str(paths.run_json)))
