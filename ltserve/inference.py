"""The Predictor: the one inference path shared by the service, the batch CLI, package evaluation and benchmarks.

    images (bytes) --decode--> uint8 (crop, crop, C) --preprocess--> float32 NCHW --predict--> logits (N, C)
                   --postprocess--> list[Prediction]

A model package (`model.onnx` + `model.json`) is loaded and verified (schema, every sha256), an ONNX Runtime
session is built with explicit providers and threads, and every batch size the Predictor will run is warmed up
once: batches are padded to power-of-two buckets up to `max_batch_size` (a batch of 5 runs as 8, the outputs are
sliced), so a serving process never meets a new input shape after start-up (cuDNN re-plans per shape on GPU).

NumPy, Pillow, pydantic and onnxruntime only: no torch, not even indirectly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, Field

from ltserve.config import unknown_choice
from ltserve.errors import ConfigError, LtserveError, PackageError
from ltserve.metrics import ShotGroup, softmax
from ltserve.package import ModelJson, load_package
from ltserve.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode, to_model_input

try:  # the serving extra: `pip install ".[cpu]"` or `".[gpu]"`
    import onnxruntime as ort
except ImportError:  # reported when a Predictor is built, so `ltserve --help` still works without it
    ort = None

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch")

# Short names accepted wherever providers are configured (CLI, LTSERVE_PROVIDERS).
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
}

# What "the best available" means when no provider is asked for, best first. TensorRT is left out on purpose:
# it needs engine and timing caches configured to start in reasonable time.
_PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "CoreMLExecutionProvider",
                        "CPUExecutionProvider")


class MissingDependency(LtserveError, ImportError):
    """A package the requested feature needs is not installed (the message names the extra to install)."""


class TopKEntry(BaseModel):
    """One ranked class of a prediction."""

    label: str
    class_index: int
    probability: float = Field(description="softmax probability in [0, 1] (of the calibrated logits)")
    shot_group: ShotGroup = Field(description="many / medium / few: how often the class was seen in training")


class Prediction(BaseModel):
    """The top-1 class of one image and its ranked top-k (top-1 first): one schema for HTTP and batch output."""

    label: str
    class_index: int
    probability: float = Field(description="softmax probability of the top-1 class")
    shot_group: ShotGroup
    top_k: list[TopKEntry] = Field(description="the k most probable classes, most probable first (top-1 included)")


def postprocess(logits: np.ndarray, labels: Sequence[str], shot_groups: Sequence[ShotGroup],
                top_k: int = 5) -> list[Prediction]:
    """Softmax (float64, then float) and the top-k classes of every row.

    Args:
        logits: (N, C).
        labels, shot_groups: C class names and shot groups (the package's).
        top_k: classes to list per image (clipped to C); >= 1.

    Returns:
        N `Prediction`s, in row order; ties go to the lower class index (the class argmax picks).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(int(top_k), len(labels))
    probs = softmax(np.asarray(logits))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(probs, order):
        entries = [TopKEntry(label=labels[j], class_index=int(j), probability=float(row[j]),
                             shot_group=shot_groups[j]) for j in idx]
        top = entries[0]
        out.append(Prediction(label=top.label, class_index=top.class_index, probability=top.probability,
                              shot_group=top.shot_group, top_k=entries))
    return out


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a Predictor runs: powers of two below `max_batch_size`, then `max_batch_size` itself.

    Example: 32 -> [1, 2, 4, 8, 16, 32]; 24 -> [1, 2, 4, 8, 16, 24].
    """
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch_size)
    return buckets


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """ONNX Runtime provider names to ask for, best first, from names or aliases (cpu, cuda, tensorrt, ...).

    None gives the best available: CUDA (or ROCm, CoreML) when the installed onnxruntime has it, then CPU.
    Providers that this onnxruntime build lacks are dropped with a warning; CPU is always last as the fallback.

    Raises:
        ConfigError: a name that is neither a provider nor an alias.
        MissingDependency: onnxruntime is not installed.
    """
    available = list(_require_ort().get_available_providers())
    if providers is None or (isinstance(providers, str) and not providers.strip()):
        chosen = [p for p in _PREFERRED_PROVIDERS if p in available]
    else:
        names = [p.strip() for p in providers.split(",")] if isinstance(providers, str) else list(providers)
        chosen = []
        known = sorted(set(PROVIDER_ALIASES) | set(PROVIDER_ALIASES.values()) | set(available))
        for name in filter(None, names):
            full = PROVIDER_ALIASES.get(name.lower(), name)
            if full not in known:
                raise ConfigError(unknown_choice("provider", name, known))
            if full not in available:
                logger.warning("provider %s is not in this onnxruntime build (available: %s); skipping it%s", full,
                               ", ".join(available), " (install the [gpu] extra for CUDA)" if "CUDA" in full else "")
                continue
            if full not in chosen:
                chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _require_ort() -> Any:
    if ort is None:
        raise MissingDependency('onnxruntime is not installed: install the serving extra, `pip install ".[cpu]"` '
                                '(CPU) or `pip install ".[gpu]"` (CUDA; not both)')
    return ort


class Predictor:
    """Loads a verified model package into an ONNX Runtime session and classifies images.

    Args:
        model_dir: a model package folder (`model.onnx`, `model.json`).
        providers: ONNX Runtime providers or aliases, best first (None: the best available); a warning is logged
            when the session falls back from the first one asked for.
        threads: CPU threads of the session (intra-op); None uses os.cpu_count(). With several worker processes,
            give each cores / workers.
        max_batch_size: the largest batch one session call runs; larger inputs to `predict` are split.
        backend: "onnxruntime", or "torch": the package's `model.pt2` through PyTorch (CUDA, fp16, CUDA graphs per
            bucket; `ltserve.torch_backend`, settings from LTSERVE_TORCH_DEVICE / _PRECISION / _CUDA_GRAPHS), for GPU
            machines with PyTorch and no onnxruntime-gpu. Needs `ltserve export ... --format onnx,pt2`.

    Raises:
        PackageError: the package is missing, invalid, fails its sha256 check, or its graph does not match
            model.json (input/output names, channels, size, classes).
        MissingDependency: onnxruntime is not installed.
        ConfigError: an unknown backend or provider, or a bad max_batch_size / threads.
    """

    def __init__(self, model_dir: str | Path, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, max_batch_size: int = 32, backend: str = "onnxruntime") -> None:
        if backend not in BACKENDS:
            raise ConfigError(unknown_choice("backend", backend, BACKENDS))
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1 (or None for os.cpu_count()), got {threads}")
        if backend == "onnxruntime":
            _require_ort()
        self.model_dir = Path(model_dir)
        self.meta: ModelJson = load_package(self.model_dir)
        self.spec: PreprocessSpec = self.meta.preprocess
        self.labels: list[str] = list(self.meta.labels)
        self.shot_groups: list[ShotGroup] = list(self.meta.shot_groups)
        self.num_classes = len(self.labels)
        self.max_batch_size = int(max_batch_size)
        self.threads = int(threads or os.cpu_count() or 1)
        self.backend = backend
        self.runner: Any = None  # the torch backend's TorchRunner
        if backend == "torch":
            # imported here: the serving install (onnxruntime) never needs torch
            from ltserve.torch_backend import TorchRunner, env_runner_options

            self.runner = TorchRunner(self.model_dir, self.meta, max_batch_size=self.max_batch_size,
                                      threads=threads, **env_runner_options())
            self.session = None
            self.requested_providers = self.providers = [f"torch:{self.runner.device}:{self.runner.precision}"]
            self._input_dtype = np.dtype(np.float32)
        else:
            self.requested_providers = resolve_providers(providers)
            self.session = self._build_session()
            self.providers = list(self.session.get_providers())
            if self.providers[0] != self.requested_providers[0]:
                logger.warning("%s: asked for %s but ONNX Runtime runs on %s (fell back)", self.model_dir,
                               self.requested_providers[0], self.providers[0])
            self._input_dtype = self._check_graph()
        self.buckets = batch_buckets(self.max_batch_size)
        self.warmup_s = self._warm_up()
        logger.info("loaded %s (%s, %d classes) on %s, %d threads, batch buckets %s, warm-up %.2f s",
                    self.model_dir, self.meta.name, self.num_classes, self.providers[0], self.threads, self.buckets,
                    self.warmup_s)

    @property
    def on_accelerator(self) -> bool:
        """Whether the model runs on a GPU (torch on CUDA, or an ONNX Runtime CUDA/TensorRT provider): then the CPU
        cores are free for decoding uploads."""
        first = self.providers[0]
        return first.startswith("torch:cuda") or first in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    # -- set-up ------------------------------------------------------------------------------------------------------

    def _build_session(self) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1  # one Gemm/conv chain: parallelism is inside ops
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # no spinning between ops: a serving process shares its cores with decode threads and the event loop, and
        # spinning workers starve them (measured: more requests/s under load; batch throughput unchanged)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = self.model_dir / "model.onnx"
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=self.requested_providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise PackageError(f"{path}: ONNX Runtime cannot load the graph: {exc}; re-export the package") from None

    def _check_graph(self) -> np.dtype:
        """Check the graph's input/output against model.json; return the input dtype the graph wants."""
        path = self.model_dir / "model.onnx"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self.meta.input_name not in inputs:
            raise PackageError(f"{path}: model.json names input {self.meta.input_name!r} but the graph has "
                               f"{sorted(inputs)}; re-export the package")
        if self.meta.output_name not in outputs:
            raise PackageError(f"{path}: model.json names output {self.meta.output_name!r} but the graph has "
                               f"{sorted(outputs)}; re-export the package")
        inp = inputs[self.meta.input_name]
        want = (self.spec.channels, self.spec.crop, self.spec.crop)
        shape = list(inp.shape)
        if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want)):
            raise PackageError(f"{path}: graph input shape {shape} does not match model.json preprocess "
                               f"(N, {want[0]}, {want[1]}, {want[2]})")
        if isinstance(shape[0], int) and (shape[0] != 1 or self.max_batch_size > 1):
            raise PackageError(f"{path}: graph batch dimension is fixed to {shape[0]} (max_batch_size "
                               f"{self.max_batch_size}); re-export with a dynamic batch (batch-1 graphs need "
                               "max_batch_size=1)")
        out_shape = list(outputs[self.meta.output_name].shape)
        if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != self.num_classes):
            raise PackageError(f"{path}: graph output shape {out_shape} does not match the {self.num_classes} "
                               "labels in model.json")
        return np.dtype(np.float16) if inp.type == "tensor(float16)" else np.dtype(np.float32)

    def _warm_up(self) -> float:
        """Run every bucket so that no request pays for a first-shape plan or allocation, and time each one.

        `bucket_ms[b]` is the time of a second run at batch b (the first pays for plans and allocations), in ms:
        what one call of that size costs here. The server's batcher uses it to run the batch size with the most
        images per second.
        """
        start = time.perf_counter()
        c, s = self.spec.channels, self.spec.crop
        self.bucket_ms: dict[int, float] = {}
        for b in self.buckets:
            x = np.zeros((b, c, s, s), dtype=np.float32)
            self._run(x)
            t0 = time.perf_counter()
            self._run(x)
            self.bucket_ms[b] = (time.perf_counter() - t0) * 1000.0
        return time.perf_counter() - start

    def bucket_for(self, n: int) -> int:
        """The batch size a chunk of n <= max_batch_size images runs at (n padded up to a bucket)."""
        return next(b for b in self.buckets if b >= n)

    # -- the four steps ----------------------------------------------------------------------------------------------

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """JPEG/PNG/WebP/BMP/GIF bytes -> uint8 (crop, crop, C) with this package's spec (`preprocess.decode`)."""
        return decode(data, self.spec, max_pixels)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (crop, crop, C) images -> normalised float32 (N, C, crop, crop)."""
        return to_model_input(images, self.spec)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a preprocessed batch.

        Args:
            batch: float32 (N, C, crop, crop), N >= 1; any N (split into max_batch_size chunks, each padded to its
                bucket).

        Returns:
            float32 logits (N, num_classes).
        """
        batch = np.asarray(batch, dtype=np.float32)
        want = (self.spec.channels, self.spec.crop, self.spec.crop)
        if batch.ndim != 4 or batch.shape[1:] != want or batch.shape[0] < 1:
            raise ValueError(f"predict expects float32 (N, {want[0]}, {want[1]}, {want[2]}) with N >= 1, "
                             f"got {batch.shape}")
        chunks = [self._run(batch[i:i + self.max_batch_size]) for i in range(0, len(batch), self.max_batch_size)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        if self.runner is not None:  # pads to its own buckets (one CUDA graph each)
            return self.runner.run(chunk)
        n = len(chunk)
        bucket = self.bucket_for(n)
        if bucket != n:  # pad to the warmed-up shape; the padding rows are sliced off below
            chunk = np.concatenate([chunk, np.zeros((bucket - n, *chunk.shape[1:]), dtype=chunk.dtype)])
        x = np.ascontiguousarray(chunk, dtype=self._input_dtype)
        (logits,) = self.session.run([self.meta.output_name], {self.meta.input_name: x})
        return np.asarray(logits[:n], dtype=np.float32)

    def postprocess(self, logits: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Softmax (float64, then float) and the top-k classes of every row; see `postprocess`."""
        return postprocess(logits, self.labels, self.shot_groups, top_k)

    # -- conveniences ------------------------------------------------------------------------------------------------

    def classify(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[Prediction]:
        """uint8 (crop, crop, C) images -> predictions (preprocess, predict, postprocess)."""
        return self.postprocess(self.predict(self.preprocess(images)), top_k)

    def classify_bytes(self, data: Sequence[bytes], top_k: int = 5,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
        """Encoded images -> predictions.

        Raises:
            InvalidImage, UnsupportedFormat, ImageTooLarge: for the first file that cannot be used.
        """
        return self.classify([self.decode(d, max_pixels) for d in data], top_k)

    def info(self) -> dict[str, Any]:
        """What the package and this session are: labels, shot groups, head, metrics, provenance, runtime."""
        m = self.meta
        return {
            "name": m.name,
            "labels": m.labels,
            "class_counts": m.class_counts,
            "shot_groups": m.shot_groups,
            "shot_thresholds": m.shot_thresholds.model_dump(),
            "preprocess": self.spec.model_dump(mode="json"),
            "head": m.head.model_dump(mode="json"),
            "metrics": m.metrics,
            "verification": m.verification,
            "graph": m.graph.model_dump(mode="json"),
            "provenance": m.provenance.model_dump(mode="json"),
            "runtime": {"backend": self.backend, "providers": self.providers, "threads": self.threads,
                        **({"torch": self.runner.info()} if self.runner is not None else {}),
                        "batch_buckets": self.buckets, "warmup_s": round(self.warmup_s, 4),
                        "bucket_ms": {str(b): round(t, 4) for b, t in self.bucket_ms.items()}},
        }


# ---------------------------------------------------------------------------------------------------------------------
# Serving: adaptive batching across concurrent requests (asyncio, in-process)
# ---------------------------------------------------------------------------------------------------------------------


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
