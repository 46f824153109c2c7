"""`ltserve predict`: offline batch prediction over folders, globs and list files, on one machine or a Ray cluster.

    ltserve predict INPUT... --model models/NAME --out preds.jsonl [--format jsonl|csv|parquet] [--top-k 5]
        [--batch-size 32] [--workers W] [--root DIR] [--errors PATH] [--resume] [--engine local|ray]

Inputs. Each INPUT is a folder (every non-hidden file below it, recursively: a file that is not an image is
reported, not skipped), a glob (`'photos/**/*.jpg'`, quoted), a single image file, or a list file (`.txt`, `.lst`,
`.list`): one path per line, or the paper's `relative/path label` lines, paths joined to `--root` (default: the list
file's folder). A label is a class index of the package (or a class name); with labels the summary adds top-1 and
many/medium/few accuracy, computed like `ltserve evaluate`.

Pipeline (local engine). Spawned decode worker processes (`decode_files`, module-level, spawn-safe) read files and
return small uint8 (crop, crop, C) arrays, a chunk at a time, with a bounded number of chunks in flight; the main
process assembles fixed-size batches and runs the `Predictor` on them while the workers decode the next chunks.
Rows are written as they are predicted and flushed after every batch.

Rows: the Predictor's `Prediction` (label, class_index, probability, shot_group, top_k) plus `path` (as the input
named it: found under a folder, matched by a glob, or written in a list file) and, when the list gives a label,
`true_label` and `true_class_index`. Failed files go to the errors file (default `<out>.errors.jsonl`) as
`{"path", "error", "reason"}`; the run carries on and exits 1 if any file failed.

Resume (`--resume`). Every output is append-only and line- or file-atomic, so a run stopped by Ctrl-C, SIGTERM or
SIGKILL continues where it stopped: paths already in the output or the errors file are skipped.
- jsonl / csv: appended and flushed per batch; a half-written last line (SIGKILL during a write) is cut off.
- parquet: a Parquet file is unreadable until its footer is written, so the output is a *directory* of part files
  (`preds.parquet/part-00000.parquet`, ...; pandas, pyarrow, DuckDB, Spark and Ray read the folder as one table).
  Rows are buffered and a part is committed (written under a temporary name, then renamed) every `--part-rows` rows
  or 60 s, and at the end or on Ctrl-C; after SIGKILL only the uncommitted part is lost, and recomputed on resume.
  The Ray engine writes the same directory.

`--engine ray` (`ltserve.batch_ray`) runs decode and inference as Ray Data stages on a local Ray instance or on the
cluster at `RAY_ADDRESS`; the rows come back to this process and go through the same writers, resume and summary.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ltserve.config import unknown_choice
from ltserve.errors import ConfigError, DataError, ImageTooLarge, InvalidInput, LtserveError
from ltserve.metrics import SHOT_GROUPS, format_percent, group_accuracy, per_class_accuracy
from ltserve.package import ModelJson, load_package
from ltserve.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "parquet")
ENGINES = ("local", "ray")
LIST_SUFFIXES = (".txt", ".lst", ".list")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
                   ".pq": "parquet"}
MAX_FILE_BYTES = 256 * 1024 * 1024
"""Files larger than this are reported as too large without being read (no image a model needs is this big)."""
_CHUNKS_IN_FLIGHT_PER_WORKER = 4  # enough to keep every worker busy while the main process runs a batch
_PART_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: folders, globs, single files and list files -> items
# ---------------------------------------------------------------------------------------------------------------------


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
                  exclude: Iterable[str | Path] = ()) -> list[Item]:
    """Every file named by the inputs, in input order, each path once.

    Args:
        inputs: folders (recursive; hidden files and folders skipped), globs, image files or list files.
        labels: the package's class names (list-file labels may be names or indices into this list).
        root: folder that relative paths in list files are joined to (None: each list file's folder).
        exclude: paths never to include (the run's own output files, when they sit inside an input folder).

    Returns:
        the items; a path named twice is kept once (the first time).

    Raises:
        ConfigError: an input that does not exist and matches nothing, or no file at all.
        DataError: a list file that cannot be read, or a line whose label is not a class of the package.
    """
    skip = {os.path.abspath(p) for p in exclude}
    items: list[Item] = []
    for spec in inputs:
        path = Path(spec)
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


# ---------------------------------------------------------------------------------------------------------------------
# Decoding in worker processes (module-level functions: safe under the spawn start method)
# ---------------------------------------------------------------------------------------------------------------------


class DecodedChunk(NamedTuple):
    """What a decode worker sends back for a chunk of files (indices are positions in the job's item list)."""

    ok: list[int]
    images: np.ndarray  # uint8 (len(ok), crop, crop, C)
    failures: list[tuple[int, str, str]]  # (index, error kind, reason)


def read_and_decode(file: str, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one file and `decode` it: uint8 (crop, crop, C).

    Raises:
        OSError: the file cannot be read.
        InvalidImage, UnsupportedFormat, ImageTooLarge: from `decode`, or a file over MAX_FILE_BYTES.
    """
    size = os.stat(file).st_size
    if size > MAX_FILE_BYTES:
        raise ImageTooLarge(f"the file is {size} bytes, more than {MAX_FILE_BYTES}; not read")
    with open(file, "rb") as f:
        data = f.read()
    return decode(data, spec, max_pixels)


def decode_files(files: Sequence[str], spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
                 offset: int = 0) -> DecodedChunk:
    """Decode files; a file that fails is reported in `failures`, never raised.

    Args:
        files: paths to read.
        spec: the package's preprocessing spec.
        max_pixels: decompression-bomb cap (width * height).
        offset: index of files[0] in the job (the indices in the result are offset + position).

    Returns:
        a DecodedChunk: indices and stacked uint8 (n, crop, crop, C) images of the good files, and
        (index, kind, reason) of the bad ones; kind is the error class (InvalidImage, UnsupportedFormat,
        ImageTooLarge) or Unreadable.
    """
    ok, images, failures = [], [], []
    for i, file in enumerate(files, offset):
        try:
            images.append(read_and_decode(file, spec, max_pixels))
            ok.append(i)
        except InvalidInput as exc:
            failures.append((i, type(exc).__name__, str(exc)))
        except OSError as exc:
            failures.append((i, "Unreadable", f"cannot read the file: {exc.strerror or exc}"))
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one odd file must not stop a million-file job
            failures.append((i, type(exc).__name__, f"unexpected error while decoding: {exc}"))
    stacked = (np.stack(images) if images
               else np.zeros((0, spec.crop, spec.crop, spec.channels), dtype=np.uint8))
    return DecodedChunk(ok, stacked, failures)


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(spec_json: str, max_pixels: int) -> None:
    # Ctrl-C / SIGTERM reach the whole process group: the main process stops the job (and then the pool), so the
    # workers ignore them and finish their chunk; if the main process dies they exit on the closed task pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # a worker waits on a task pipe that it also holds open (spawned queues pickle both ends), so it would outlive
    # a main process killed alone (OOM killer, kill -9 PID): watch the parent and leave with it
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    _WORKER_STATE["spec"] = PreprocessSpec.model_validate_json(spec_json)
    _WORKER_STATE["max_pixels"] = max_pixels


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _decode_in_worker(files: list[str], offset: int) -> DecodedChunk:
    return decode_files(files, _WORKER_STATE["spec"], _WORKER_STATE["max_pixels"], offset)


class DecodePool:
    """Decode files in chunks, in order, in spawned worker processes, with a bounded number of chunks in flight.

    Entering the context starts the workers and submits the first `workers * 4` chunks, so decoding starts while
    the caller is still loading its model; iterating yields one DecodedChunk per chunk, in file order, and submits
    the next chunk each time one is taken (memory stays bounded however many files there are).

    Args:
        files: paths; the indices in each chunk are positions in this sequence.
        spec: the package's preprocessing spec.
        workers: decode processes; 0 decodes in the iterating process (no overlap with inference).
        chunk_size: files per task (one pickle round trip each).
        max_pixels: decompression-bomb cap.

    Raises:
        LtserveError: (while iterating) a worker process died (killed for memory, or a crash in an image decoder).
    """

    def __init__(self, files: Sequence[str], spec: PreprocessSpec, workers: int, chunk_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.files, self.spec, self.workers = list(files), spec, int(workers)
        self.chunk_size, self.max_pixels = int(chunk_size), int(max_pixels)
        self._todo = iter(range(0, len(self.files), self.chunk_size))
        self._pending: deque = deque()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "DecodePool":
        if self.workers > 0:
            # spawn, not fork: a forked child of a process running onnxruntime (or any threads) can deadlock
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(self.spec.model_dump_json(), self.max_pixels))
            for s in itertools.islice(self._todo, self.workers * _CHUNKS_IN_FLIGHT_PER_WORKER):
                self._submit(s)
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, s: int) -> None:
        assert self._pool is not None
        self._pending.append((s, self._pool.submit(_decode_in_worker, self.files[s:s + self.chunk_size], s)))

    def __iter__(self) -> Iterator[DecodedChunk]:
        if self._pool is None:
            for s in self._todo:
                yield decode_files(self.files[s:s + self.chunk_size], self.spec, self.max_pixels, s)
            return
        while self._pending:
            s, future = self._pending.popleft()
            try:
                chunk = future.result()
            except BrokenProcessPool:
                last = self.files[min(s + self.chunk_size, len(self.files)) - 1]
                raise LtserveError(f"a decode worker died while decoding {self.files[s]} ... {last} (out of memory, "
                                   "or a crash inside an image decoder; or, when called from your own script, the "
                                   "script lacks the `if __name__ == '__main__':` guard that spawned workers need); "
                                   "the rows written so far are kept: rerun with --resume (and fewer --workers if "
                                   "memory is short)") from None
            nxt = next(self._todo, None)
            if nxt is not None:
                self._submit(nxt)
            yield chunk


# ---------------------------------------------------------------------------------------------------------------------
# Writers: append-only, resumable
# ---------------------------------------------------------------------------------------------------------------------


class _AppendedFile:
    """A text output appended per batch (JSONL, CSV): `flush` after every chunk, `close` at the end."""

    _f: io.TextIOWrapper | None = None

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class JsonlSink(_AppendedFile):
    """One JSON object per line, appended and flushed per batch; resumable after SIGKILL.

    Args:
        path: the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f: io.TextIOWrapper | None = None

    def recover(self) -> Iterator[dict]:
        """Rows already in the file (a half-written last line is cut off first). Nothing if there is no file."""
        if not self.path.exists():
            return
        _truncate_torn_tail(self.path)
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError:
                    raise DataError(f"{self.path}:{lineno}: not a JSON line, so this file was not written by "
                                    "ltserve predict (or was edited); move it away or run without --resume") from None

    def start(self, append: bool) -> None:
        """Open for appending (resume) or truncate."""
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, rows: Sequence[dict]) -> None:
        assert self._f is not None, "start() first"
        # one write call per batch: a kill can only tear the last line, which recover() cuts off
        self._f.write("".join(json.dumps(r, ensure_ascii=True, allow_nan=False) + "\n" for r in rows))


class CsvSink(_AppendedFile):
    """CSV with a header; top_k is one JSON column. Appended and flushed per batch; resumable after SIGKILL.

    Args:
        path: the file.
        labelled: add the true_label and true_class_index columns.
    """

    BASE_COLUMNS = ["path", "label", "class_index", "probability", "shot_group", "top_k"]

    def __init__(self, path: Path, labelled: bool) -> None:
        self.path = Path(path)
        self.columns = self.BASE_COLUMNS + (["true_label", "true_class_index"] if labelled else [])
        self._f: io.TextIOWrapper | None = None
        self._writer: Any = None

    def recover(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        _truncate_torn_tail(self.path)
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            if header != self.columns:
                raise ConfigError(f"{self.path}: its columns {header} differ from this run's {self.columns} (a "
                                  "list with labels adds true_label, true_class_index); resume with the same inputs")
            for values in reader:
                if len(values) != len(header):
                    raise DataError(f"{self.path}: row {values[:1]} has {len(values)} fields, expected "
                                    f"{len(header)}; the file was edited; move it away or run without --resume")
                row: dict[str, Any] = dict(zip(header, values))
                row["class_index"] = int(row["class_index"])
                if row.get("true_class_index"):
                    row["true_class_index"] = int(row["true_class_index"])
                yield row

    def start(self, append: bool) -> None:
        fresh = not append or not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "w" if fresh else "a", newline="", encoding="utf-8", errors="surrogateescape")
        self._writer = csv.writer(self._f, lineterminator="\n")
        if fresh:
            self._writer.writerow(self.columns)

    def write(self, rows: Sequence[dict]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in rows:
            values = {**r, "top_k": json.dumps(r["top_k"])}
            w.writerow(["" if values.get(c) is None else values[c] for c in self.columns])
        assert self._f is not None, "start() first"
        self._f.write(buf.getvalue())


class ParquetSink:
    """A directory of Parquet part files; a part is committed (tmp file, then rename) every `part_rows` rows.

    A Parquet file is unreadable until its footer is written, so a part is written under a temporary name and
    renamed when complete: a reader, or `--resume` after SIGKILL, only ever sees whole parts.

    Args:
        path: the output directory (e.g. preds.parquet).
        labelled: add the true_label and true_class_index columns.
        part_rows: rows per part file (also the row-group size).
        part_seconds: commit a part at the first flush after this many seconds, so a slow run loses little.
    """

    def __init__(self, path: Path, labelled: bool, part_rows: int = 100_000, part_seconds: float = _PART_SECONDS):
        pa = _require_pyarrow()
        self.path = Path(path)
        self.part_rows = int(part_rows)
        self.part_seconds = part_seconds
        entry = pa.struct([("label", pa.string()), ("class_index", pa.int64()), ("probability", pa.float64()),
                           ("shot_group", pa.string())])
        fields = [("path", pa.string()), ("label", pa.string()), ("class_index", pa.int64()),
                  ("probability", pa.float64()), ("shot_group", pa.string()), ("top_k", pa.list_(entry))]
        if labelled:
            fields += [("true_label", pa.string()), ("true_class_index", pa.int64())]
        self.schema = pa.schema(fields)
        self._rows: list[dict] = []
        self._next_part = 0
        self._opened = time.monotonic()

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def recover(self) -> Iterator[dict]:
        if not self.path.is_dir():
            return
        import pyarrow.parquet as pq

        for tmp in self.path.glob(".part-*.tmp"):  # a part that was being written when the run was killed
            tmp.unlink()
        columns = [c for c in ("path", "class_index", "shot_group", "true_class_index") if c in self.schema.names]
        for part in self._parts():
            names = pq.read_schema(part).names
            if names != self.schema.names:
                raise ConfigError(f"{part}: its columns {names} differ from this run's {self.schema.names} (a list "
                                  "with labels adds true_label, true_class_index); resume with the same inputs")
            yield from pq.read_table(part, columns=columns).to_pylist()

    def start(self, append: bool) -> None:
        if not append and self.path.exists():
            _remove_parquet_dir(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        parts = self._parts()
        self._next_part = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        self._opened = time.monotonic()

    def write(self, rows: Sequence[dict]) -> None:
        self._rows.extend(rows)
        while len(self._rows) >= self.part_rows:
            self._commit(self._rows[:self.part_rows])
            self._rows = self._rows[self.part_rows:]

    def flush(self) -> None:
        if self._rows and time.monotonic() - self._opened >= self.part_seconds:
            self._commit(self._rows)
            self._rows = []

    def close(self) -> None:
        if self._rows:
            self._commit(self._rows)
            self._rows = []

    def _commit(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{self._next_part:05d}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), tmp, row_group_size=self.part_rows)
        os.replace(tmp, self.path / name)
        self._next_part += 1
        self._opened = time.monotonic()


def _require_pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise LtserveError('--format parquet needs pyarrow: `pip install pyarrow` (or the ray extra, '
                           '`pip install ".[ray]"`), or write --format jsonl / csv') from None
    return pyarrow


def _remove_parquet_dir(path: Path) -> None:
    """Delete a previous run's part files, and the folder if nothing else is in it (never other files)."""
    others = [p for p in path.iterdir() if not (p.name.startswith(("part-", ".part-")))]
    if others:
        raise ConfigError(f"{path}: holds files that ltserve predict did not write ({others[0].name}, ...); "
                          "choose another --out")
    for p in path.iterdir():
        p.unlink()


def _truncate_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (written in part when the process was killed)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        back = min(size, 1 << 16)
        while True:
            f.seek(size - back)
            tail = f.read(back)
            cut = tail.rfind(b"\n")
            if cut >= 0 or back == size:
                break
            back = min(size, back * 4)
        keep = size - back + cut + 1  # 0 when there is no newline at all
        if keep < size:
            logger.warning("%s: cutting a half-written last line (%d bytes) left by an interrupted run", path,
                           size - keep)
            f.truncate(keep)


# ---------------------------------------------------------------------------------------------------------------------
# Tally and summary
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts for the summary: rows per predicted shot group, failures by kind, (pred, true) of labelled rows."""

    meta: ModelJson
    rows: int = 0
    errors: int = 0
    by_group: Counter = field(default_factory=Counter)
    by_error: Counter = field(default_factory=Counter)
    pred: list[int] = field(default_factory=list)
    true: list[int] = field(default_factory=list)

    def add_row(self, row: dict) -> None:
        self.rows += 1
        self.by_group[row["shot_group"]] += 1
        if row.get("true_class_index") not in (None, ""):
            self.pred.append(int(row["class_index"]))
            self.true.append(int(row["true_class_index"]))

    def add_error(self, row: dict) -> None:
        self.errors += 1
        self.by_error[row.get("error", "?")] += 1

    def accuracy(self) -> dict[str, Any] | None:
        """top1 and many/medium/few (mean per-class accuracy in each group, as `ltserve evaluate`), or None."""
        if not self.true:
            return None
        pred, true = np.asarray(self.pred), np.asarray(self.true)
        pc = per_class_accuracy(pred, true, len(self.meta.labels))
        return {"n": int(true.size), "top1": float(np.mean(pred == true)), "balanced_accuracy": float(np.nanmean(pc)),
                **group_accuracy(pc, self.meta.shot_groups)}


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PredictOptions:
    """Everything `ltserve predict` takes (see `cli` for the meaning of each)."""

    inputs: list[str]
    model: Path
    out: Path
    format: str | None = None
    top_k: int = 5
    batch_size: int = 32
    workers: int | None = None
    root: str | None = None
    errors: Path | None = None
    resume: bool = False
    overwrite: bool = False
    engine: str = "local"
    threads: int | None = None
    providers: str | None = None
    backend: str = "onnxruntime"
    max_pixels: int = DEFAULT_MAX_PIXELS
    part_rows: int = 100_000
    chunk_size: int | None = None
    concurrency: int = 1
    num_gpus: float = 0.0
    ray_num_cpus: int | None = None
    progress: bool = True


def default_workers() -> int:
    """Decode processes by default: one core is left to the inference session (at least one worker)."""
    return max(1, (os.cpu_count() or 2) - 1)


def resolve_format(out: Path, fmt: str | None) -> str:
    """--format, or the format the --out suffix names.

    Raises:
        ConfigError: an unknown format, or no --format and an unknown suffix.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(unknown_choice("--format", fmt, FORMATS))
        return fmt
    suffix = out.suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ConfigError(f"{out}: cannot tell the output format from the suffix {suffix or '(none)'!r}; name the file "
                          f".jsonl, .csv or .parquet, or pass --format {'|'.join(FORMATS)}")
    return _SUFFIX_FORMATS[suffix]


def _check_options(o: PredictOptions) -> None:
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


def _prepare_outputs(out: Path, errors: Path, fmt: str, resume: bool, overwrite: bool) -> None:
    """Fail before any work if an output cannot be written or would overwrite a finished run by accident."""
    for path, is_dir in ((out, fmt == "parquet"), (errors, False)):
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


def _make_sink(fmt: str, out: Path, labelled: bool, part_rows: int) -> JsonlSink | CsvSink | ParquetSink:
    if fmt == "jsonl":
        return JsonlSink(out)
    if fmt == "csv":
        return CsvSink(out, labelled)
    return ParquetSink(out, labelled, part_rows=part_rows)


class Output:
    """The row and error writers of one job, with its tally and progress bar."""

    def __init__(self, rows: JsonlSink | CsvSink | ParquetSink, errors: JsonlSink, tally: Tally, bar: Any) -> None:
        self.rows_sink, self.errors_sink, self.tally, self.bar = rows, errors, tally, bar
        self.new_rows = 0
        self.new_errors = 0
        self.started = time.perf_counter()
        self.ready_at: float | None = None
        self.ended: float | None = None

    def ready(self) -> None:
        """Mark the model as loaded: throughput is measured from here."""
        self.ready_at = time.perf_counter()

    def rows(self, rows: list[dict]) -> None:
        self.rows_sink.write(rows)
        for r in rows:
            self.tally.add_row(r)
        self.new_rows += len(rows)

    def errors(self, errors: list[dict]) -> None:
        self.errors_sink.write(errors)
        for e in errors:
            self.tally.add_error(e)
        self.new_errors += len(errors)

    def flush(self, done: int) -> None:
        self.rows_sink.flush()
        self.errors_sink.flush()
        self.bar.update(done)

    def close(self) -> None:
        self.ended = time.perf_counter()
        self.rows_sink.close()
        self.errors_sink.close()


def prediction_row(item: Item, prediction: dict, labels: Sequence[str]) -> dict:
    """One output row: path, the Prediction's fields, and the true label when the list gave one."""
    row = {"path": item.key, **prediction}
    if item.label is not None:
        row["true_label"] = labels[item.label]
        row["true_class_index"] = item.label
    return row


def error_row(item: Item, kind: str, reason: str) -> dict:
    """One errors-file row."""
    return {"path": item.key, "error": kind, "reason": reason}


def run_local(items: Sequence[Item], opts: PredictOptions, meta: ModelJson, output: Output) -> None:
    """Decode in worker processes and predict in this one, fixed-size batches, rows written as they come."""
    from ltserve.inference import Predictor

    workers = default_workers() if opts.workers is None else opts.workers
    chunk = opts.chunk_size or min(opts.batch_size, 32)
    pending_items: list[Item] = []
    pending_images: list[np.ndarray] = []
    # the workers start (and decode the first chunks) while the Predictor loads and warms up
    with DecodePool([it.file for it in items], meta.preprocess, workers, chunk, opts.max_pixels) as pool:
        predictor = Predictor(opts.model, providers=opts.providers, threads=opts.threads,
                              max_batch_size=opts.batch_size, backend=opts.backend)
        output.ready()

        def run_batch(n: int) -> None:
            batch_items, batch_images = pending_items[:n], pending_images[:n]
            del pending_items[:n], pending_images[:n]
            preds = predictor.postprocess(predictor.predict(predictor.preprocess(batch_images)), opts.top_k)
            output.rows([prediction_row(it, p.model_dump(mode="json"), predictor.labels)
                         for it, p in zip(batch_items, preds)])

        for decoded in pool:
            if decoded.failures:
                output.errors([error_row(items[i], kind, reason) for i, kind, reason in decoded.failures])
            pending_items.extend(items[i] for i in decoded.ok)
            pending_images.extend(decoded.images)
            while len(pending_items) >= opts.batch_size:
                run_batch(opts.batch_size)
            output.flush(len(decoded.ok) + len(decoded.failures))
    if pending_items:
        run_batch(len(pending_items))
        output.flush(0)


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
    _check_options(opts)
    if opts.engine == "ray":
        from ltserve.batch_ray import require_ray

        require_ray()  # a missing extra fails before any work, like a missing model
    meta = load_package(opts.model)  # before anything else: a missing model fails at once
    fmt = resolve_format(opts.out, opts.format)
    errors_path = opts.errors or opts.out.with_name(opts.out.name + ".errors.jsonl")
    _prepare_outputs(opts.out, errors_path, fmt, opts.resume, opts.overwrite)
    items = expand_inputs(opts.inputs, meta.labels, opts.root, exclude=[opts.out, errors_path])
    labelled = any(it.label is not None for it in items)
    rows_sink, errors_sink = _make_sink(fmt, opts.out, labelled, opts.part_rows), JsonlSink(errors_path)
    tally = Tally(meta)
    done = _recover(rows_sink, errors_sink, tally, items) if opts.resume else set()
    todo = [it for it in items if it.key not in done]
    rows_sink.start(append=opts.resume)
    errors_sink.start(append=opts.resume)
    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="predict", dynamic_ncols=True,
               disable=not opts.progress, smoothing=0.1)
    output = Output(rows_sink, errors_sink, tally, bar)
    try:
        if todo:
            if opts.engine == "ray":
                from ltserve.batch_ray import run_ray

                run_ray(todo, opts, meta, output)
            else:
                run_local(todo, opts, meta, output)
    finally:  # also on Ctrl-C: everything predicted so far is written, so --resume loses nothing
        output.close()
        bar.close()
    return summarize(opts, meta, fmt, errors_path, items, todo, output)


def _recover(rows_sink: JsonlSink | CsvSink | ParquetSink, errors_sink: JsonlSink, tally: Tally,
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


def summarize(opts: PredictOptions, meta: ModelJson, fmt: str, errors_path: Path, items: Sequence[Item],
              todo: Sequence[Item], output: Output) -> dict[str, Any]:
    """The job summary.

    Returns:
        dict with model, engine, format, output, errors_file, files, predicted, failed (whole job, resumed rows
        included), resumed (files done by an earlier run), new_rows, new_errors, errors_by_kind, shot_groups
        (predicted rows per shot group of the predicted class), elapsed_s (this run, seconds), setup_s (model
        loading: from the start to `Output.ready`; Ray loads its actors lazily, inside the pipeline), images_per_s
        (files processed by this run per second after set-up: the pipeline's throughput), and accuracy (top1,
        balanced_accuracy, many, medium, few, n) when the inputs had labels.
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
        "batch_size": opts.batch_size, "workers": default_workers() if opts.workers is None else opts.workers,
        "elapsed_s": round(end - output.started, 3), "setup_s": round(ready - output.started, 3),
        "images_per_s": round(processed / (end - ready), 2) if processed and end > ready else None,
        "accuracy": t.accuracy(),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The summary printed at the end of `ltserve predict`."""
    lines = [f"{s['files']} files: {s['predicted']} predicted, {s['failed']} failed"
             + (f" ({s['resumed']} done by an earlier run)" if s["resumed"] else ""),
             f"  output: {s['output']}" + (f"; failures in {s['errors_file']}" if s["failed"] else "")]
    if s["failed"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_kind"].items())))
    lines.append("  predictions by shot group: " + ", ".join(f"{g} {s['shot_groups'][g]}" for g in SHOT_GROUPS))
    lines.append(f"  throughput: {s['images_per_s']} images/s ({s['new_rows'] + s['new_errors']} files in "
                 f"{s['elapsed_s']:.2f} s, {s['setup_s']:.2f} s of it loading the model; engine {s['engine']}, "
                 f"batch {s['batch_size']})")
    acc = s.get("accuracy")
    if acc:
        lines.append(f"  accuracy on {acc['n']} labelled images: top-1 {format_percent(acc['top1'])} %, "
                     f"many {format_percent(acc['many'])}, medium {format_percent(acc['medium'])}, "
                     f"few {format_percent(acc['few'])}, balanced {format_percent(acc['balanced_accuracy'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `ltserve predict`."""
    p = argparse.ArgumentParser(
        prog="ltserve predict", description="Offline batch prediction with a model package: folders, globs or list "
        "files in; JSONL, CSV or Parquet rows out; bad files to an errors file; resumable.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folder (recursive), glob (quoted), image, or list file "
                   "(.txt/.lst/.list: 'path' or 'path label' per line)")
    p.add_argument("--model", required=True, type=Path, help="model package folder, e.g. models/fashion-lt")
    p.add_argument("--out", required=True, type=Path, help="output file (.jsonl, .csv), or a folder of Parquet part "
                   "files (.parquet; read as one table by pandas, pyarrow, DuckDB, Ray)")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from the --out suffix)")
    p.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference call (default 32)")
    p.add_argument("--workers", type=int, help=f"decode processes (default cores - 1 = {default_workers()}; 0: "
                   "decode in the main process); ray: decode tasks (default: as CPUs allow)")
    p.add_argument("--root", help="folder that relative paths in list files are joined to (default: the list's)")
    p.add_argument("--errors", type=Path, help="errors file (default: <out>.errors.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its output files")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local process pool, or Ray Data (extra 'ray'; "
                   "the cluster at RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--threads", type=int, help="inference threads per session (default: all cores)")
    p.add_argument("--providers", help="ONNX Runtime providers, comma separated (cpu, cuda, ...)")
    p.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="local engine: onnxruntime (default), or torch for the package's model.pt2 on a GPU machine "
                        "without onnxruntime-gpu (export with --format onnx,pt2)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images (width*height)")
    p.add_argument("--part-rows", type=int, default=100_000, help="rows per Parquet part file (default 100000)")
    p.add_argument("--concurrency", type=int, default=1, help="ray: Predictor actors (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="ray: GPUs per Predictor actor (default 0)")
    p.add_argument("--ray-num-cpus", type=int, help="ray: CPUs of the local Ray instance (ignored with RAY_ADDRESS)")
    p.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli(argv: list[str] | None = None) -> int:
    """`ltserve predict ...`: exit 0 when every file was predicted, 1 when any failed (listed in the errors file).

    A missing model, an unwritable output or bad options raise LtserveError (the dispatcher prints it, exit 2).
    """
    args = build_parser().parse_args(argv)
    opts = PredictOptions(
        inputs=args.inputs, model=args.model, out=args.out, format=args.format, top_k=args.top_k,
        batch_size=args.batch_size, workers=args.workers, root=args.root, errors=args.errors, resume=args.resume,
        overwrite=args.overwrite, engine=args.engine, threads=args.threads, providers=args.providers,
        backend=args.backend, max_pixels=args.max_pixels, part_rows=args.part_rows, concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        ray_num_cpus=args.ray_num_cpus, progress=not args.no_progress)
    # SIGTERM (batch schedulers, `kill`) stops like Ctrl-C: written rows are kept and --resume continues
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run_predict(opts)
    except KeyboardInterrupt:
        print(f"interrupted: rows so far are in {opts.out}; continue with the same command and --resume",
              file=sys.stderr)
        return 130  # the shell's code for SIGINT; returned, not re-raised, so the dispatcher adds no second line
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary))
    if args.summary_json:
        from ltserve.rundir import write_json

        write_json(args.summary_json, summary)
    return 1 if summary["failed"] else 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(cli())
