"""What `ltserve predict` reads: folders, globs, single files and list files, expanded into items (one per file).

Each may also be a URL on object storage (`s3://bucket/prefix/`, a glob or list file there): see
`ltserve.batch.storage`. An item's key and file are then the object's URL."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ltserve.batch import storage
from ltserve.errors import ConfigError, DataError, unknown_choice

logger = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Item:
    """One file to predict.

    Attributes:
        key: the path as the input named it; the `path` column of the output and the resume key.
        file: where to read it (key joined to --root for list entries).
        label: class index from a list file, or None.
    """

    key: str
    file: str
    label: int | None = None


def expand_inputs(inputs: Sequence[str], labels: Sequence[str], root: str | None = None,
                  exclude: Iterable[str | Path] = (), storage_options: dict[str, Any] | None = None) -> list[Item]:
    """Every file named by the inputs, in input order, each path once.

    Args:
        inputs: folders (recursive; hidden files and folders skipped), globs, image files or list files.
        labels: the package's class names (list-file labels may be names or indices into this list).
        root: folder that relative paths in list files are joined to (None: each list file's folder).
        exclude: paths never to include (the run's own output files, when they sit inside an input folder).
        storage_options: fsspec options for inputs on object storage (`--storage-option`).

    Returns:
        the items; a path named twice is kept once (the first time).

    Raises:
        ConfigError: an input that does not exist and matches nothing, or no file at all.
        DataError: a list file that cannot be read, or a line whose label is not a class of the package.
    """
    skip = {os.path.abspath(p) for p in exclude if not storage.is_url(p)}
    skip_urls = tuple(str(p).rstrip("/") for p in exclude if storage.is_url(p))
    items: list[Item] = []
    for spec in inputs:
        path = Path(spec)
        if storage.is_url(spec):
            # the run's own output folders, when they lie under an input prefix
            items += [it for it in _url_items(spec, labels, root, storage_options)
                      if not any(it.file == u or it.file.startswith(u + "/") for u in skip_urls)]
            continue
        if path.is_dir():
            found = [Item(p, p) for p in _walk_files(spec)]
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            found = read_list_file(path, labels, root)
        elif path.is_file():
            found = [Item(spec, spec)]
        elif glob.has_magic(spec):
            found = [Item(p, p) for p in sorted(glob.glob(spec, recursive=True)) if not os.path.isdir(p)]
            if not found:
                raise ConfigError(f"{spec}: the glob matches no file; check the pattern (quote it so that the "
                                  "shell does not expand it)")
        else:
            raise ConfigError(f"{spec}: no such file, folder or glob; give a folder, a glob, an image or a list "
                              f"file ({', '.join(LIST_SUFFIXES)})")
        items += [it for it in found if os.path.abspath(it.file) not in skip]
    seen: set[str] = set()
    unique = [it for it in items if not (it.key in seen or seen.add(it.key))]  # first occurrence wins
    if len(unique) < len(items):
        logger.warning("%d paths were named more than once; each is predicted once", len(items) - len(unique))
    if not unique:
        raise ConfigError(f"no files to predict in {', '.join(inputs)}")
    return unique


def _url_items(spec: str, labels: Sequence[str], root: str | None,
               options: dict[str, Any] | None) -> list[Item]:
    """The items of an input on object storage: a folder (recursive), a glob, an object, or a list file."""
    kind, urls = storage.list_url(spec, options)
    if kind == "missing":
        raise ConfigError(f"{spec}: no such object or prefix; check the URL (and AWS_ENDPOINT_URL or "
                          "--storage-option endpoint_url=... for an S3-compatible server)")
    if kind == "glob" and not urls:
        raise ConfigError(f"{spec}: the glob matches no object; check the pattern")
    if kind == "file" and spec.lower().endswith(LIST_SUFFIXES):
        try:
            text = storage.read_text(spec, options)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{spec}: cannot read the list file ({type(exc).__name__})") from None
        base = root if root is not None else spec.rsplit("/", 1)[0]
        index = {name: j for j, name in enumerate(labels)}
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                rel, label = _split_list_line(line, index, f"{spec}:{lineno}")
                items.append(Item(rel, storage.join_url(base, rel) if storage.is_url(base) else str(Path(base) / rel),
                                  label))
        return items
    return [Item(u, u) for u in urls]


def _walk_files(folder: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return out


def read_list_file(path: Path, labels: Sequence[str], root: str | None = None) -> list[Item]:
    """Read a list file: `path` or `path label` per line (blank lines and `#` comments skipped).

    A line with a tab is split at its last tab (so a class name may contain spaces); otherwise a last
    whitespace-separated token that is an integer or a class name of the package is the label. Relative paths are
    joined to `root` (None: the list file's folder); the item key stays the path as written.

    Raises:
        DataError: unreadable file, or an integer label outside 0..C-1 / an unknown class name after a tab.
    """
    base = Path(root) if root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the list file ({exc})") from None
    index = {name: j for j, name in enumerate(labels)}
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel, label = _split_list_line(line, index, f"{path}:{lineno}")
        items.append(Item(rel, str(base / rel), label))
    return items


def _split_list_line(line: str, index: dict[str, int], where: str) -> tuple[str, int | None]:
    if "\t" in line:
        rel, token = (s.strip() for s in line.rsplit("\t", 1))
    else:
        parts = line.rsplit(None, 1)
        if len(parts) == 1 or not (_is_int(parts[1]) or parts[1] in index):
            return line, None
        rel, token = parts
    if _is_int(token):
        label = int(token)
        if not 0 <= label < len(index):
            raise DataError(f"{where}: label {label} is not a class of the package (0..{len(index) - 1}); the list's "
                            "labels must follow the package's class order (`ltserve inspect MODEL` lists it)")
        return rel, label
    if token not in index:
        raise DataError(f"{where}: {unknown_choice('label', token, list(index))}")
    return rel, index[token]


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()

