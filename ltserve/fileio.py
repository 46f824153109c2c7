"""Writing files so that a reader never sees half of one, and hashing them. The one place that does either.

    atomic_write(path, write)      write(tmp) fills a temporary file beside `path`, then it replaces `path`
    atomic_write_text(path, text)  the same for a text
    write_json(path, obj)          atomic JSON, NaN written as null
    json_text(obj)                 the same JSON as a string (what `--json -` prints)
    sha256_file(path)              hex sha256 of a file's bytes

A temporary file lives in the same folder (so the final rename is atomic on POSIX), starts with a dot and carries
the process id, so two processes writing the same path never share one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable


def temporary_path(path: str | Path) -> Path:
    """The temporary sibling `atomic_write` fills: `.<name>.<pid>.tmp` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it onto `path`.

    The folder is created when missing. If `write` raises, the temporary file is removed and `path` is unchanged.

    Returns:
        `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic JSON (indented), with NaN written as null and NumPy scalars and arrays as plain numbers and lists."""
    return atomic_write_text(path, json_text(obj))


def json_text(obj: Any) -> str:
    """Indented JSON of `obj`, NaN as null, NumPy scalars and arrays as plain numbers and lists (as `write_json`)."""
    return json.dumps(_nan_to_none(obj), indent=2, default=_json_default)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # NumPy arrays and scalars, without importing NumPy here
        return _nan_to_none(obj.tolist())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
