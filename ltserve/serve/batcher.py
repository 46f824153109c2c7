"""Adaptive batching across concurrent requests, for an asyncio server: check each request's images from their
headers (a pixel budget per request), decode them (small ones on the event loop, others in a thread pool, huge ones
on a lane of their own), queue, and run one batch at a time on the Predictor in its own thread (in-process: no hop
between processes; a cheap model with nothing queued runs on the event loop)."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from ltserve.errors import ConfigError, ImageTooLarge, LtserveError
from ltserve.preprocess import DEFAULT_MAX_PIXELS, decode_opened, open_header
from ltserve.runtime import Prediction, Predictor

INLINE_DECODE_PIXELS = 40_000
"""Requests whose images all hold at most this many pixels (200x200) are decoded on the event loop: at most a few
hundred microseconds each, less than the round trip through a thread pool."""

INLINE_MODEL_MS = 0.25
"""A lone batch whose model call took at most this long at warm-up runs on the event loop (see `outputs`)."""

LARGE_IMAGE_PIXELS = 4_000_000
"""Images above this many pixels (2560x1440 is 3.7 MP) decode on the large-image lane: 30-300 ms each on one core,
against well under 10 ms for the images a classifier usually gets."""


class _Job:
    __slots__ = ("images", "future", "t_enqueued")

    def __init__(self, images: list[np.ndarray], future: Any, t_enqueued: float) -> None:
        self.images = images
        self.future = future
        self.t_enqueued = t_enqueued


class AsyncPredictor:
    """Classifies encoded images for an asyncio server, batching concurrent requests into one Predictor call.

    Each request's files are first checked from their headers alone, read once (format, size, the per-image cap and
    the per-request pixel budget), so a request over budget costs microseconds per file and decodes nothing. Then
    they are decoded: on the event loop when every image holds at most `INLINE_DECODE_PIXELS`, else in one of two
    thread pools, images up to `LARGE_IMAGE_PIXELS` on the main lane (`decode_threads` threads), larger ones on a
    lane of their own (`decode_threads - 1` threads, at least one), so a request of ordinary images never waits
    behind a flood of huge ones; at worst they share the cores. Decoded images are queued. One worker task runs one
    batch at a time in its own thread: when the model is free it runs the queued images (up to `max_batch_size`) at
    the batch size with the most images per second as timed at warm-up (see `_batch_target`); it waits for more, at
    most `max_latency_ms` after the oldest queued request arrived, only while other requests are still being
    decoded. So a lone request runs at once (no batching delay at
    concurrency 1), and under load batches grow by themselves while the previous batch runs, as far as larger
    batches pay.

    Args:
        predictor: the loaded Predictor.
        max_batch_size: most images in one call (default: the Predictor's); 1 turns batching off.
        max_latency_ms: longest a queued request waits for companions.
        decode_threads: threads decoding uploads (default: every core when the model runs on a GPU, else
            min(4, os.cpu_count()), leaving the rest to inference).
        on_batch: called with the number of images of every batch run (metrics).
        inline_model_ms: a lone batch whose model call took at most this long at warm-up runs on the event loop
            (0: every batch goes through the model thread and can grow with concurrent requests).
    """

    def __init__(self, predictor: Predictor, max_batch_size: int | None = None, max_latency_ms: float = 5.0,
                 decode_threads: int | None = None, on_batch: Any = None,
                 inline_model_ms: float = INLINE_MODEL_MS) -> None:
        self.predictor = predictor
        self.max_batch_size = int(max_batch_size or predictor.max_batch_size)
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_wait_s = max(0.0, float(max_latency_ms)) / 1000.0
        self.on_batch = on_batch
        self.inline_model_ms = float(inline_model_ms)
        cores = os.cpu_count() or 1
        self.decode_threads = int(decode_threads or (cores if predictor.on_accelerator else min(4, cores)))
        self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="ltserve-decode")
        # huge images get their own threads, one fewer than the main lane: they never hold every decode thread
        self._large_pool = ThreadPoolExecutor(max(1, self.decode_threads - 1),
                                              thread_name_prefix="ltserve-decode-large")
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="ltserve-predict")  # one batch at a time
        self._queue: deque[_Job] = deque()
        self._incoming = 0  # requests decoding now: the worker may wait for them
        self._busy = False  # a batch is running in the model thread
        self._wakeup: Any = None
        self._worker: Any = None

    async def classify(self, files: Sequence[bytes], top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS,
                       max_request_pixels: int | None = None) -> list[Prediction]:
        """`outputs_of` and the Predictor's postprocess: one Prediction per file, in order."""
        logits, features = await self.outputs_of(files, max_pixels, max_request_pixels)
        return self.predictor.postprocess(logits, top_k, features=features)

    async def outputs_of(self, files: Sequence[bytes], max_pixels: int = DEFAULT_MAX_PIXELS,
                         max_request_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Check, decode, batch with concurrent requests and predict: the logits (N, C) of `files`, in order, and
        their penultimate features (N, D) when the model gives them (`Predictor.predict_outputs`), else None.

        Each header is read once, on the event loop (microseconds, no pixel decoded); images of at most
        `INLINE_DECODE_PIXELS` pixels are decoded there too (a thread hop costs more than their decode), larger ones
        in the decode threads.

        Args:
            files: encoded images, as bytes.
            max_pixels: cap on width * height of each image, from its header.
            max_request_pixels: cap on the pixels of all `files` together, from their headers (None: no cap).

        Raises:
            InvalidInput (InvalidImage, UnsupportedFormat, ImageTooLarge): a file is not a usable image (for
                several files the message starts with its index, `images[i]: ...`), or the files hold more than
                `max_request_pixels` pixels in all (ImageTooLarge; nothing was decoded).
        """
        headers = [_attempt(open_header, f, max_pixels) for f in files]
        _raise_first(headers, len(files))
        sizes = [h.pixels for h in headers]
        if max_request_pixels is not None and sum(sizes) > max_request_pixels:
            raise ImageTooLarge(
                f"{len(files)} image(s) of {sum(sizes)} pixels in all (the largest {max(sizes)}); a request may "
                f"hold at most {max_request_pixels} pixels (LTSERVE_MAX_REQUEST_PIXELS): send fewer or smaller "
                "images per request")
        spec = self.predictor.spec
        if max(sizes) <= INLINE_DECODE_PIXELS:
            results = [_attempt(decode_opened, h, spec) for h in headers]
        else:
            loop = asyncio.get_running_loop()
            self._incoming += 1
            try:
                results = await asyncio.gather(*[
                    loop.run_in_executor(self._large_pool if n > LARGE_IMAGE_PIXELS else self._decode_pool,
                                         decode_opened, h, spec)
                    for h, n in zip(headers, sizes)], return_exceptions=True)
            finally:
                self._incoming -= 1
                self._notify()
        _raise_first(results, len(files))
        return await self.outputs(results)

    async def outputs(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Queue decoded uint8 (crop, crop, C) images; their (logits (N, C), features (N, D) or None) once their
        batch has run.

        When nothing is queued or running and the model's warm-up time for this batch is at most
        `inline_model_ms`, the batch runs at once on the event loop: a round trip through the model thread costs
        more than such a model (a linear head on small images), and no other request is there to batch with.
        """
        if not self._queue and not self._busy and self._model_ms(len(images)) <= self.inline_model_ms:
            return self._predict(images)
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
            self._busy = True
            try:
                logits, features = await loop.run_in_executor(self._model_pool, self._predict, images)
            except Exception as exc:  # a server fault: every waiting request gets it (answered 500)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            start = 0
            for j in jobs:
                end = start + len(j.images)
                if not j.future.done():
                    j.future.set_result((logits[start:end], None if features is None else features[start:end]))
                start = end

    def _model_ms(self, n: int) -> float:
        """The warm-up time of the bucket that runs `n` images (ms; infinite beyond one model call)."""
        if n > self.max_batch_size:
            return float("inf")
        return self.predictor.bucket_ms.get(self.predictor.bucket_for(n), float("inf"))

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

    def _predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.predictor.predict_outputs(self.predictor.preprocess(images))
        if self.on_batch is not None:
            self.on_batch(len(images))
        return outputs

    @property
    def running(self) -> bool:
        """True unless the batching worker died (it starts with the first request)."""
        return self._worker is None or not self._worker.done()

    def close(self) -> None:
        """Stop the worker and the thread pools."""
        if self._worker is not None:
            self._worker.cancel()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._large_pool.shutdown(wait=False, cancel_futures=True)
        self._model_pool.shutdown(wait=False, cancel_futures=True)


def _attempt(fn: Any, *args: Any) -> Any:
    """fn(*args), or the exception it raised (checked in file order by `_raise_first`)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - every per-file error is reported by `_raise_first`
        return exc


def _raise_first(results: Sequence[Any], n_files: int) -> None:
    """Raise the first exception among per-file `results`; an ltserve error of one of several files names its
    index (`images[i]: ...`)."""
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            if isinstance(r, LtserveError) and n_files > 1:
                raise type(r)(f"images[{i}]: {r}") from None
            raise r
