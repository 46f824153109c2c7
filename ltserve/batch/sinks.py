"""The outputs of `ltserve predict`: append-only, resumable row writers (JSONL, CSV, a folder of Parquet parts).

Every output is append-only and line- or file-atomic, so a run stopped by Ctrl-C, SIGTERM or SIGKILL continues
where it stopped: `recover()` yields what an earlier run wrote (cutting a half-written last line first).
- jsonl / csv: appended and flushed per batch; a half-written last line (SIGKILL during a write) is cut off.
- parquet: a Parquet file is unreadable until its footer is written, so the output is a *directory* of part files
  (`preds.parquet/part-00000.parquet`, ...; pandas, pyarrow, DuckDB, Spark and Ray read the folder as one table).
  Rows are buffered and a part is committed (written under a temporary name, then renamed) every `part_rows` rows
  or 60 s, and at the end or on Ctrl-C; after SIGKILL only the uncommitted part is lost, and recomputed on resume.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from ltserve.errors import ConfigError, DataError, MissingDependency
from ltserve.fileio import atomic_write

logger = logging.getLogger(__name__)

_PART_SECONDS = 60.0


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

    BASE_COLUMNS = ["path", "label", "class_index", "probability", "shot_group", "top_k", "unknown", "ood_score"]

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
                # empty: an image rejected as unknown (--open-set reject)
                row["class_index"] = int(row["class_index"]) if row["class_index"] else None
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


class PartBuffer:
    """Rows buffered into whole parts: a part is committed (`_commit`, the subclass's) every `part_rows` rows, or
    on `flush` once `part_seconds` have passed since the last, and the rest at `close`. Subclasses set `_rows`,
    `part_rows`, `part_seconds` and `_opened` (monotonic time of the last commit)."""

    _rows: list[dict]
    part_rows: int
    part_seconds: float
    _opened: float

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
        raise NotImplementedError


class ParquetSink(PartBuffer):
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
                  ("probability", pa.float64()), ("shot_group", pa.string()), ("top_k", pa.list_(entry)),
                  ("unknown", pa.bool_()), ("ood_score", pa.float64())]
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
        columns = [c for c in ("path", "class_index", "shot_group", "true_class_index", "unknown")
                   if c in self.schema.names]
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

    def _commit(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=self.schema)
        atomic_write(self.path / f"part-{self._next_part:05d}.parquet",
                     lambda tmp: pq.write_table(table, tmp, row_group_size=self.part_rows))
        self._next_part += 1
        self._opened = time.monotonic()


def _require_pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise MissingDependency('--out-format parquet needs pyarrow: `pip install pyarrow` (or the ray extra, '
                           '`pip install ".[ray]"`), or write --out-format jsonl / csv') from None
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

