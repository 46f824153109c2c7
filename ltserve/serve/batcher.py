"""Adaptive batching across concurrent requests, for an asyncio server: decode in a thread pool, queue, and run one
batch at a time on the Predictor in its own thread (in-process: no hop between processes)."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.errors import ConfigError, LtserveError
from ltserve.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode
from ltserve.runtime import Prediction, Predictor


class _Job:
    __slots__ = ("images", "future", "t_enqueued")

    def __init__(self, images: list[np.ndarray], future: Any, t_enqueued: float) -> None:
        self.images = images
        self.future = future
        self.t_enqueued = t_enqueued


class AsyncPredictor:
    """Classifies encoded images for an asyncio server, batching concurrent requests into one Predictor call.

    Each request's files are decoded in a thread pool, then queued. One worker task runs one batch at a time in its
    own thread: when the model is free it runs the queued images (up to `max_batch_size`) at the batch size with
    the most images per second as timed at warm-up (see `_batch_target`); it waits for more, at most
    `max_latency_ms` after the oldest queued request arrived, only while other requests are still being decoded.
    So a lone request runs at once (no batching delay at concurrency 1), and under load batches grow by themselves
    while the previous batch runs, as far as larger batches pay.

    Args:
        predictor: the loaded Predictor.
        max_batch_size: most images in one call (default: the Predictor's); 1 turns batching off.
        max_latency_ms: longest a queued request waits for companions.
        decode_threads: threads decoding uploads (default: every core when the model runs on a GPU, else
            min(4, os.cpu_count()), leaving the rest to inference).
        on_batch: called with the number of images of every batch run (metrics).
    """

    def __init__(self, predictor: Predictor, max_batch_size: int | None = None, max_latency_ms: float = 5.0,
                 decode_threads: int | None = None, on_batch: Any = None) -> None:
        self.predictor = predictor
        self.max_batch_size = int(max_batch_size or predictor.max_batch_size)
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_wait_s = max(0.0, float(max_latency_ms)) / 1000.0
        self.on_batch = on_batch
        cores = os.cpu_count() or 1
        self.decode_threads = int(decode_threads or (cores if predictor.on_accelerator else min(4, cores)))
        self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="ltserve-decode")
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="ltserve-predict")  # one batch at a time
        self._queue: deque[_Job] = deque()
        self._incoming = 0  # requests decoding now: the worker may wait for them
        self._wakeup: Any = None
        self._worker: Any = None

    async def classify(self, files: Sequence[bytes | Path], top_k: int = 5,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
        """Decode, batch with concurrent requests, predict and postprocess; one Prediction per file, in order.

        Args:
            files: encoded images, as bytes or paths of uploaded files.

        Raises:
            InvalidInput (InvalidImage, UnsupportedFormat, ImageTooLarge): a file is not a usable image; for
                several files the message starts with its index, `images[i]: ...`.
        """
        loop = asyncio.get_running_loop()
        self._incoming += 1
        try:
            futures = [loop.run_in_executor(self._decode_pool, _decode_file, f, self.predictor.spec, max_pixels)
                       for f in files]
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            self._incoming -= 1
            self._notify()
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                if isinstance(r, LtserveError) and len(files) > 1:
                    raise type(r)(f"images[{i}]: {r}") from None
                raise r
        logits = await self.logits(results)
        return self.predictor.postprocess(logits, top_k)

    async def logits(self, images: list[np.ndarray]) -> np.ndarray:
        """Queue decoded uint8 (crop, crop, C) images; their logits (N, C) once their batch has run."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work(), name="ltserve-batcher")
        job = _Job(list(images), loop.create_future(), loop.time())
        self._queue.append(job)
        self._notify()
        return await job.future

    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].t_enqueued + self.max_wait_s
            while (self._incoming > 0 and sum(len(j.images) for j in self._queue) < self.max_batch_size
                   and (remaining := deadline - loop.time()) > 0):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            target = self._batch_target(sum(len(j.images) for j in self._queue if not j.future.done()))
            jobs, n = [], 0
            while self._queue and (not jobs or n + len(self._queue[0].images) <= target):
                job = self._queue.popleft()
                if job.future.done():  # the client went away (timeout, disconnect)
                    continue
                jobs.append(job)
                n += len(job.images)
            if not jobs:
                continue
            images = [im for j in jobs for im in j.images]
            try:
                logits = await loop.run_in_executor(self._model_pool, self._predict, images)
            except Exception as exc:  # a server fault: every waiting request gets it (answered 500)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(logits[start:start + len(j.images)])
                start += len(j.images)

    def _batch_target(self, queued: int) -> int:
        """How many of the `queued` images to run now: the size with the most images per second.

        Candidates are the buckets up to min(queued, max_batch_size), and all queued images padded to their bucket;
        each scores size / measured time of its bucket (`Predictor.bucket_ms`). Where a call has a fixed overhead
        (small models, GPUs) the largest batch wins; where per-image cost grows with the batch (convolutions on a
        few CPU cores, or padding 9 images to 16) smaller runs win, and the rest of the queue runs next.
        """
        cap = min(queued, self.max_batch_size)
        if cap <= 1:
            return 1
        cost = self.predictor.bucket_ms
        candidates = [b for b in self.predictor.buckets if b <= cap] + [cap]
        return max(candidates, key=lambda k: (k / max(cost[self.predictor.bucket_for(k)], 1e-6), k))

    def _predict(self, images: list[np.ndarray]) -> np.ndarray:
        logits = self.predictor.predict(self.predictor.preprocess(images))
        if self.on_batch is not None:
            self.on_batch(len(images))
        return logits

    @property
    def running(self) -> bool:
        """True unless the batching worker died (it starts with the first request)."""
        return self._worker is None or not self._worker.done()

    def close(self) -> None:
        """Stop the worker and the thread pools."""
        if self._worker is not None:
            self._worker.cancel()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._model_pool.shutdown(wait=False, cancel_futures=True)


def _decode_file(file: bytes | Path, spec: PreprocessSpec, max_pixels: int) -> np.ndarray:
    """`decode` of bytes, or of a file's bytes (read in the worker thread, off the event loop)."""
    data = file if isinstance(file, (bytes, bytearray, memoryview)) else Path(file).read_bytes()
    return decode(bytes(data), spec, max_pixels)
