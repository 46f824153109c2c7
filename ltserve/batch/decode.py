"""Decoding files in spawned worker processes, a chunk at a time, with a bounded number of chunks in flight.

Module-level functions only, so they pickle by reference under the spawn start method (and into Ray tasks).
"""

from __future__ import annotations

import errno
import itertools
import logging
import multiprocessing
import os
import signal
import stat
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from ltserve.batch import storage
from ltserve.errors import ImageTooLarge, InvalidInput, LtserveError
from ltserve.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 256 * 1024 * 1024
"""Files larger than this are reported as too large without being read (no image a model needs is this big)."""
STOP_GRACE_S = 5.0
"""When a job stops early, how long a decode worker may take to finish its chunk and leave before it is killed."""
_CHUNKS_IN_FLIGHT_PER_WORKER = 4  # enough to keep every worker busy while the main process runs a batch


class DecodedChunk(NamedTuple):
    """What a decode worker sends back for a chunk of files (indices are positions in the job's item list)."""

    ok: list[int]
    images: np.ndarray  # uint8 (len(ok), crop, crop, C)
    failures: list[tuple[int, str, str]]  # (index, error kind, reason)


def read_and_decode(file: str, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
                    storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Read one file (or object-storage URL, see `ltserve.batch.storage`) and `decode` it: uint8 (crop, crop, C).

    Raises:
        OSError: the file cannot be read.
        InvalidImage, UnsupportedFormat, ImageTooLarge: from `decode`, or a file over MAX_FILE_BYTES.
    """
    if storage.is_url(file):
        try:
            data = storage.read_url(file, storage_options, MAX_FILE_BYTES)
        except ValueError:
            raise ImageTooLarge(f"the object is larger than {MAX_FILE_BYTES} bytes; not decoded") from None
        return decode(data, spec, max_pixels)
    info = os.stat(file)
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO would block this worker until something writes to it
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)")
    size = info.st_size
    if size > MAX_FILE_BYTES:
        raise ImageTooLarge(f"the file is {size} bytes, more than {MAX_FILE_BYTES}; not read")
    with open(file, "rb") as f:
        data = f.read()
    return decode(data, spec, max_pixels)


def decode_files(files: Sequence[str], spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
                 offset: int = 0, storage_options: dict[str, Any] | None = None) -> DecodedChunk:
    """Decode files; a file that fails is reported in `failures`, never raised.

    Args:
        files: paths to read.
        spec: the package's preprocessing spec.
        max_pixels: decompression-bomb cap (width * height).
        offset: index of files[0] in the job (the indices in the result are offset + position).
        storage_options: fsspec options for files named by URL (`--storage-option`).

    Returns:
        a DecodedChunk: indices and stacked uint8 (n, crop, crop, C) images of the good files, and
        (index, kind, reason) of the bad ones; kind is the error class (InvalidImage, UnsupportedFormat,
        ImageTooLarge) or Unreadable.
    """
    ok, images, failures = [], [], []
    for i, file in enumerate(files, offset):
        try:
            images.append(read_and_decode(file, spec, max_pixels, storage_options))
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


def _init_worker(spec_json: str, max_pixels: int, storage_options: dict[str, Any] | None = None) -> None:
    # Ctrl-C / SIGTERM reach the whole process group: the main process stops the job (and then the pool), so the
    # workers ignore them and finish their chunk; if the main process dies they exit on the closed task pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # a worker waits on a task pipe that it also holds open (spawned queues pickle both ends), so it would outlive
    # a main process killed alone (OOM killer, kill -9 PID): watch the parent and leave with it
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    _WORKER_STATE["spec"] = PreprocessSpec.model_validate_json(spec_json)
    _WORKER_STATE["max_pixels"] = max_pixels
    _WORKER_STATE["storage_options"] = storage_options


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _decode_in_worker(files: list[str], offset: int) -> DecodedChunk:
    return decode_files(files, _WORKER_STATE["spec"], _WORKER_STATE["max_pixels"], offset,
                        _WORKER_STATE["storage_options"])


def stop_processes(processes: Sequence[multiprocessing.process.BaseProcess], grace_s: float) -> None:
    """Wait up to `grace_s` seconds (in all) for processes to exit, then SIGKILL the rest (decode workers ignore
    SIGINT and SIGTERM, see `_init_worker`, and hold nothing that must be saved)."""
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            logger.warning("decode worker %s did not stop within %.0f s of the job stopping: killed", p.pid, grace_s)
            p.kill()
            p.join(1.0)


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
        storage_options: fsspec options for files named by URL (each worker opens its own file systems).

    Raises:
        LtserveError: (while iterating) a worker process died (killed for memory, or a crash in an image decoder).
    """

    def __init__(self, files: Sequence[str], spec: PreprocessSpec, workers: int, chunk_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: dict[str, Any] | None = None) -> None:
        self.files, self.spec, self.workers = list(files), spec, int(workers)
        self.chunk_size, self.max_pixels = int(chunk_size), int(max_pixels)
        self.storage_options = storage_options
        self._todo = iter(range(0, len(self.files), self.chunk_size))
        self._pending: deque = deque()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "DecodePool":
        if self.workers > 0:
            # spawn, not fork: a forked child of a process running onnxruntime (or any threads) can deadlock
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(self.spec.model_dump_json(), self.max_pixels,
                                                       self.storage_options))
            for s in itertools.islice(self._todo, self.workers * _CHUNKS_IN_FLIGHT_PER_WORKER):
                self._submit(s)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if exc_type is None:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        # stopping (Ctrl-C, SIGTERM, an error): nothing more is needed from the workers, and the caller still has
        # rows to write, so a worker that does not leave promptly is killed instead of waited for
        workers = list((getattr(pool, "_processes", None) or {}).values())  # private, but the only handle on them
        pool.shutdown(wait=False, cancel_futures=True)
        stop_processes(workers, STOP_GRACE_S)

    def _submit(self, s: int) -> None:
        assert self._pool is not None
        self._pending.append((s, self._pool.submit(_decode_in_worker, self.files[s:s + self.chunk_size], s)))

    def __iter__(self) -> Iterator[DecodedChunk]:
        if self._pool is None:
            for s in self._todo:
                yield decode_files(self.files[s:s + self.chunk_size], self.spec, self.max_pixels, s,
                                   self.storage_options)
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

