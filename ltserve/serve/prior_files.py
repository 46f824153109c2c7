"""The files through which a server's workers share one live prior: a state file per worker and a reset marker.

`<state_dir>/worker-<index>.npz` holds one worker's window (its logits and wall-clock times, the model's sha256, a
format version), written atomically (a temporary file, then a rename) by that worker only; the others read it,
again only when its mtime or size changed. `<state_dir>/reset.json` {"at": wall-clock time, "model": sha256} says
that every image seen before `at` is forgotten. Every file has one writer and readers see whole files only, so no
lock between processes is needed. A state file that cannot be used (corrupt, another package's, another class
count) is moved aside to `<name>.corrupt-<time>` when it is the worker's own (kept for inspection), skipped with a
warning when it is another's.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ltserve.fileio import atomic_write, write_json
from ltserve.package import ModelJson
from ltserve.runtime.prior import softmax64

logger = logging.getLogger(__name__)

STATE_VERSION = 1
RESET_FILE = "reset.json"


def default_state_dir(meta: ModelJson) -> Path:
    """<temp dir>/ltserve-prior-<uid>/<package name>-<model.onnx sha256, 12 hex>: one folder per package, so a new
    package never inherits an old package's estimate. It outlives worker and server restarts, not a reboot or a new
    container: set LTSERVE_PRIOR_STATE_DIR to a volume for that, and give each server on one host its own."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return (Path(tempfile.gettempdir()) / f"ltserve-prior-{uid}"
            / f"{meta.name}-{meta.files['model.onnx'].sha256[:12]}")


class Unusable(Exception):
    """A state file this package cannot use (the message says why)."""


class PriorFiles:
    """One worker's access to the server's prior files.

    Args:
        state_dir: the server's state folder (created).
        worker: this worker's name (BentoML's worker index).
        model_sha: the package's model.onnx sha256 (files of another model are not used).
        num_classes: C.
    """

    def __init__(self, state_dir: Path, worker: str, model_sha: str, num_classes: int) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / f"worker-{worker}.npz"
        self.model_sha, self.num_classes = model_sha, num_classes
        self._cache: dict[Path, tuple[tuple[int, int], np.ndarray, np.ndarray]] = {}
        self._reset_mtime: int | None = None

    def write(self, logits: np.ndarray, times: np.ndarray, total: int) -> None:
        """Write this worker's window atomically; a failed write is logged (the estimate lives on in memory)."""
        arrays = {"logits": logits, "times": times, "total": np.int64(total), "model": np.str_(self.model_sha),
                  "version": np.int64(STATE_VERSION)}
        try:
            atomic_write(self.path, lambda tmp: _save(tmp, arrays))
        except OSError as exc:  # a full disk must not fail requests
            logger.error("%s: cannot write the live prior state (%s); the estimate is kept in memory only",
                         self.path, exc)

    def load_own(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        """This worker's saved window (logits, times, total), None when there is none or it was moved aside."""
        if not self.path.is_file():
            return None
        try:
            return self._read(self.path)
        except Unusable as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            self.path.replace(aside)
            logger.error("%s: live prior state unusable (%s); moved to %s, starting from the target prior",
                         self.path, exc, aside.name)
            return None

    def others(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(probabilities (n, C) float64, times (n,)) of the other workers' files, re-read only when one changed."""
        out, seen = [], set()
        for path in sorted(self.state_dir.glob("worker-*.npz")):
            if path == self.path:
                continue
            seen.add(path)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = (st.st_mtime_ns, st.st_size)
            hit = self._cache.get(path)
            if hit is None or hit[0] != key:
                try:
                    logits, times, _ = self._read(path)
                except Unusable as exc:
                    logger.warning("%s: skipped in the live prior (%s)", path, exc)
                    logits, times = np.zeros((0, self.num_classes), np.float32), np.zeros(0)
                hit = (key, softmax64(logits) if len(logits) else np.zeros((0, self.num_classes)), times)
                self._cache[path] = hit
            out.append((hit[1], hit[2]))
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return out

    def write_reset(self, at: float) -> None:
        """Mark every image seen before wall-clock time `at` as forgotten, for every worker."""
        write_json(self.state_dir / RESET_FILE, {"at": at, "model": self.model_sha})

    def read_reset(self, force: bool = False) -> float | None:
        """The time of a reset marker written since the last call (any call when `force`), else None."""
        path = self.state_dir / RESET_FILE
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime == self._reset_mtime and not force:
            return None
        self._reset_mtime = mtime
        try:
            raw = json.loads(path.read_text())
            at = float(raw["at"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable reset marker (%s); ignored", path, exc)
            return None
        return at if raw.get("model") in (None, self.model_sha) else None  # another package sharing the folder

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray, int]:
        """(logits (n, C) float32, times (n,), total) of a state file, checked against this package."""
        c = self.num_classes
        try:
            with np.load(path, allow_pickle=False) as z:
                version, model = int(z["version"]), str(z["model"])
                logits, times, total = z["logits"], z["times"], int(z["total"])
        except Exception as exc:  # noqa: BLE001 - zip, npy and key errors all mean "not a state file we can use"
            raise Unusable(f"not a readable state file: {type(exc).__name__}: {exc}") from None
        if version != STATE_VERSION:
            raise Unusable(f"state version {version}, this ltserve writes {STATE_VERSION}")
        if model != self.model_sha:
            raise Unusable(f"written for another model (model.onnx sha256 {model[:12]}, this one "
                           f"{self.model_sha[:12]})")
        if logits.ndim != 2 or logits.shape[1] != c or times.shape != (len(logits),) or not np.isfinite(logits).all():
            raise Unusable(f"logits {logits.shape} / times {times.shape} do not fit {c} classes")
        return logits.astype(np.float32), times.astype(np.float64), total


def _save(tmp: Path, arrays: dict[str, Any]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
        np.savez(f, **arrays)
