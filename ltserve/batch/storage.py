"""Object storage for `ltserve predict`: inputs and outputs named by URL (`s3://bucket/prefix/`, or any other fsspec
protocol whose package is installed: gs://, az://, ...), read and written through fsspec.

Credentials and endpoint come from where the storage's own client looks: for S3 (s3fs, botocore) the variables
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (an
S3-compatible server such as MinIO or Ceph), AWS_PROFILE with ~/.aws, or an instance role. `--storage-option
KEY=VALUE` passes fsspec options (e.g. `endpoint_url=http://minio:9000`, `anon=true`) to every file system the job
opens: in this process, in the decode workers and in Ray tasks. Neither is ever logged or put in an error message.

Outputs on object storage are folders of part objects (`part-00000.jsonl`, `.csv` or `.parquet`): an object is
written whole by one PUT and never appended to, so a part is all or nothing. Rows are buffered and a part is
committed every `--part-rows` rows or 60 s, and at the end or on Ctrl-C; after a SIGKILL only the uncommitted rows
are lost, and `--resume` (which reads the committed parts back) predicts them again: none lost, none twice. The
errors go to a folder of JSONL parts beside the output (`<out>.errors/`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from typing import Any, Iterator, Sequence

from ltserve.batch.sinks import PartBuffer
from ltserve.errors import ConfigError, DataError, MissingDependency

logger = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PART_SUFFIX = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
_PART_SECONDS = 60.0


def is_url(path: object) -> bool:
    """True for a URL naming object storage (`s3://...`); local paths and `file://` URLs are not."""
    text = str(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def parse_storage_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """`--storage-option KEY=VALUE` pairs as fsspec options; a VALUE that is JSON (true, 3, {...}) is decoded.

    Raises:
        ConfigError: a pair without '=' (the value is not echoed: it may be a secret).
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option {key.strip() or '?'}: expected KEY=VALUE, e.g. "
                              "endpoint_url=http://127.0.0.1:9000")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec file system, path without the protocol) of a URL.

    Raises:
        MissingDependency: the protocol's package is not installed (s3fs for s3://: the `s3` extra).
        ConfigError: fsspec does not know the protocol.
    """
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with bentoml
        raise MissingDependency("object storage needs fsspec: `pip install \"ltserve[s3]\"`") from None
    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError as exc:
        raise MissingDependency(f"{url.split('://')[0]}:// needs a package that is not installed ({exc}); for S3: "
                                "`pip install \"ltserve[s3]\"` (s3fs)") from None
    except ValueError as exc:
        raise ConfigError(f"{_scheme(url)}: not an object storage protocol fsspec knows ({exc})") from None


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] + "://"


def read_url(url: str, options: dict[str, Any] | None, max_bytes: int) -> bytes:
    """The bytes of one object, or OSError (FileNotFoundError, PermissionError, ...) as a local read would raise.

    Raises:
        ValueError: the object is larger than `max_bytes` (not read).
    """
    fs, path = filesystem(url, options)
    data = fs.cat_file(path, start=0, end=max_bytes + 1)  # one ranged GET: no separate size request
    if len(data) > max_bytes:
        raise ValueError(f"more than {max_bytes}")
    return data


def join_url(base: str, rel: str) -> str:
    """A list-file entry relative to a URL folder (an absolute URL stays as it is)."""
    if is_url(rel):
        return rel
    return base.rstrip("/") + "/" + rel.lstrip("/")


def list_url(spec: str, options: dict[str, Any] | None) -> tuple[str, list[str]]:
    """What a URL input names: ("glob" | "folder" | "file" | "missing", the object URLs, sorted).

    A folder is listed recursively, skipping names that start with '.' (as local folders are walked).
    """
    fs, path = filesystem(spec, options)
    try:
        if any(c in path for c in "*?["):
            return "glob", sorted(fs.unstrip_protocol(p) for p in fs.glob(path) if not fs.isdir(p))
        if fs.isfile(path):
            return "file", [spec]
        if fs.isdir(path):
            root = path.rstrip("/")
            found = [p for p in fs.find(root) if not any(part.startswith(".")
                                                         for part in p[len(root):].split("/") if part)]
            return "folder", sorted(fs.unstrip_protocol(p) for p in found)
    except PermissionError:
        raise ConfigError(f"{spec}: access denied; check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) and "
                          "the endpoint (AWS_ENDPOINT_URL or --storage-option endpoint_url=...)") from None
    return "missing", []


def read_text(url: str, options: dict[str, Any] | None) -> str:
    """A text object (a list file) as UTF-8."""
    fs, path = filesystem(url, options)
    return fs.cat_file(path).decode("utf-8")


def remote_format(out: str, fmt: str | None, formats: Sequence[str]) -> str:
    """The output format of an object-storage --out: --out-format, else its last name's suffix, else jsonl."""
    if fmt is not None:
        return fmt
    name = out.rstrip("/").rsplit("/", 1)[-1].lower()
    for f in formats:
        if name.endswith(PART_SUFFIX.get(f, "." + f)) or (f == "parquet" and name.endswith(".pq")):
            return f
    return "jsonl"


def prepare_remote_output(url: str, options: dict[str, Any] | None, resume: bool, overwrite: bool) -> None:
    """Fail before any work: an output folder with parts in it needs --resume or --overwrite, and the folder must
    be writable (a probe object is written and removed).

    Raises:
        ConfigError: naming the URL and the fix (never the credentials).
    """
    fs, path = filesystem(url, options)
    folder = path.rstrip("/")
    try:
        exists = bool(fs.exists(folder)) and bool(fs.find(folder))
        if exists and not (resume or overwrite):
            raise ConfigError(f"{url}: already holds objects; pass --resume to continue that run, --overwrite to "
                              "replace it, or choose another --out")
        probe = f"{folder}/.ltserve-probe-{time.time_ns()}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore raises its own classes for credentials and endpoints
        raise ConfigError(f"{url}: the output is not writable ({type(exc).__name__}); check the bucket, the "
                          "credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) and the endpoint (AWS_ENDPOINT_URL or "
                          "--storage-option endpoint_url=...)") from None


class PartsSink(PartBuffer):
    """An output folder of part objects on object storage: rows buffered, a part written whole by one PUT.

    The same interface as the local sinks (`recover`, `start`, `write`, `flush`, `close`).

    Args:
        url: the folder (e.g. s3://bucket/out/).
        fmt: jsonl, csv or parquet.
        labelled: add the true_label and true_class_index columns (csv, parquet).
        part_rows: rows per part.
        options: fsspec storage options.
        part_seconds: commit a part at the first flush after this many seconds.
    """

    BASE_COLUMNS = ["path", "label", "class_index", "probability", "shot_group", "top_k"]

    def __init__(self, url: str, fmt: str, labelled: bool, part_rows: int = 100_000,
                 options: dict[str, Any] | None = None, part_seconds: float = _PART_SECONDS) -> None:
        self.url, self.fmt, self.labelled = url, fmt, labelled
        self.fs, path = filesystem(url, options)
        self.folder = path.rstrip("/")
        self.part_rows, self.part_seconds = int(part_rows), part_seconds
        self.suffix = PART_SUFFIX[fmt]
        self._rows: list[dict] = []
        self._next_part = 0
        self._opened = time.monotonic()
        self._columns: list[str] | None = None

    def _parts(self) -> list[str]:
        if not self.fs.exists(self.folder):
            return []
        pattern = re.compile(r"^part-(\d+)" + re.escape(self.suffix) + "$")
        return sorted(p for p in self.fs.ls(self.folder, detail=False)
                      if pattern.match(p.rstrip("/").rsplit("/", 1)[-1]))

    def recover(self) -> Iterator[dict]:
        """Rows of the parts an earlier run committed."""
        for part in self._parts():
            data = self.fs.cat_file(part)
            where = self.fs.unstrip_protocol(part)
            if self.fmt == "jsonl":
                for lineno, line in enumerate(data.splitlines(), 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            raise DataError(f"{where}:{lineno}: not a JSON line, so this part was not written by "
                                            "ltserve predict; move it away or run without --resume") from None
            elif self.fmt == "csv":
                for row in csv.DictReader(io.StringIO(data.decode("utf-8"))):
                    row["class_index"] = int(row["class_index"]) if row.get("class_index") else None
                    if row.get("true_class_index"):
                        row["true_class_index"] = int(row["true_class_index"])
                    yield row
            else:
                import pyarrow.parquet as pq

                yield from pq.read_table(io.BytesIO(data)).to_pylist()

    def start(self, append: bool) -> None:
        parts = self._parts()
        if not append and parts:
            others = [p for p in self.fs.find(self.folder) if p not in parts]
            if others:
                raise ConfigError(f"{self.url}: holds objects that ltserve predict did not write "
                                  f"({others[0].rsplit('/', 1)[-1]}, ...); choose another --out")
            self.fs.rm(parts)
            parts = []
        last = parts[-1].rsplit("/", 1)[-1] if parts else None
        self._next_part = int(last[len("part-"):-len(self.suffix)]) + 1 if last else 0
        self._opened = time.monotonic()

    def _commit(self, rows: list[dict]) -> None:
        path = f"{self.folder}/part-{self._next_part:05d}{self.suffix}"
        self.fs.pipe_file(path, self._encode(rows))  # one PUT: the part exists whole or not at all
        self._next_part += 1
        self._opened = time.monotonic()

    def _encode(self, rows: list[dict]) -> bytes:
        if self.fmt == "jsonl":
            return "".join(json.dumps(r, ensure_ascii=True, allow_nan=False) + "\n" for r in rows).encode()
        columns = self._columns_of(rows)
        if self.fmt == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(columns)
            for r in rows:
                w.writerow(["" if r.get(c) is None else json.dumps(r[c]) if c == "top_k" else r[c]
                            for c in columns])
            return buf.getvalue().encode("utf-8")
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), out)
        return out.getvalue()

    def _columns_of(self, rows: list[dict]) -> list[str]:
        """The base columns, the labelled ones, then any other field the rows carry (in first-seen order)."""
        if self._columns is None:
            extra = ["true_label", "true_class_index"] if self.labelled else []
            seen = [k for r in rows for k in r if k not in self.BASE_COLUMNS and k not in extra]
            self._columns = self.BASE_COLUMNS + extra + list(dict.fromkeys(seen))
        return self._columns
