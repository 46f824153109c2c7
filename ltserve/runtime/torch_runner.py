"""A second runtime for the same folded graph: PyTorch, for GPU machines that have torch and no onnxruntime-gpu.

The model package's `model.pt2` (written by `ltserve export RUN --head HEAD --out DIR --model-format onnx,pt2`, a
`torch.export` program of backbone -> feature transform -> one Gemm, the same graph as `model.onnx`) is loaded with
`torch.export.load`, its sha256 checked against `model.json`, and run:

- on CPU: fp32, eagerly (the exported ATen graph), any batch size;
- on CUDA: fp32 or fp16 (weights cast with `.half()`; the logits come back float32), channels_last weights and
  input, cuDNN autotuning, and one CUDA graph captured per padded batch bucket (powers of two up to
  `max_batch_size`, the Predictor's buckets), so a call is one host-to-device copy from pinned memory, one graph
  replay and one device-to-host copy. The float32 -> fp16 cast and the NCHW -> channels_last reorder are captured
  inside the graph, so the host only ever copies plain float32 NCHW.

With `device_preprocess=True` the runner also takes the uint8 pixels before normalisation (N, H, W, C), as
`ltserve.preprocess.stack_pixels` makes them (`run_pixels`): the host copies a quarter of the bytes, and the cast,
`(pixel * (1 / 255) - mean) / std` (`ltserve.preprocess.normalize_pixels`, the same float32 operations in the same
order) and NHWC -> NCHW run on the device, captured in the same CUDA graph as the model (one static uint8 input per
bucket). A permuted NHWC tensor already has channels_last strides, so the reorder costs nothing on CUDA.

Only the Predictor imports this module, and only for `backend="torch"`: the serving install needs no torch.
No environment variables are read here: the service's settings (`LTSERVE_TORCH_*`) arrive as arguments.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from ltserve.errors import ConfigError, PackageError
from ltserve.package import ModelJson, load_package, verify_files
from ltserve.runtime.buckets import batch_buckets, bucket_for

log = logging.getLogger(__name__)

PT2 = "model.pt2"
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16"]


def export_hint(model_dir: str | Path) -> str:
    """How to make a package's model.pt2 (part of every error about a missing or stale one)."""
    return (f"re-export the package with the PyTorch program: `ltserve export runs/NAME --head HEAD --out "
            f"{model_dir} --model-format onnx,pt2` (with the torch version that will load it)")


class TorchRunner:
    """Runs a package's `model.pt2` with PyTorch: float32 NCHW batches in, float32 logits out.

    Args:
        model_dir: a model package folder holding `model.pt2` (listed with its sha256 in `model.json`).
        meta: the package's `ModelJson`; None reads and validates `model.json` (without re-hashing other files).
        device: "cuda", "cpu", or "auto" (CUDA when torch sees a GPU).
        precision: "auto" (fp16 on CUDA, fp32 on CPU), "fp32" or "fp16" (CUDA only; with device="auto" on a
            machine without a GPU, fp16 falls back to fp32 with a warning).
        cuda_graphs: on CUDA, capture one CUDA graph per padded batch bucket (on first use, or in `warmup`).
        max_batch_size: the largest batch one graph replay runs; longer inputs to `run` are split. Clipped to the
            largest batch the exported program accepts.
        threads: CPU threads for PyTorch's intra-op pool (None leaves torch's default: the physical cores).
        compile: wrap the module in `torch.compile` (inductor, mode "max-autotune-no-cudagraphs") before the CUDA
            graphs are captured; compiles once per bucket shape, which takes minutes for a ResNet-50.
        device_preprocess: also accept uint8 (N, crop, crop, C) pixels (`run_pixels`) and normalise them on the
            device, inside the CUDA graph. The Predictor checks this path against the host's normalisation at
            start-up before it uses it (`Predictor(..., torch_options={"device_preprocess": True})`).

    Raises:
        PackageError: model.pt2 is missing, not listed in model.json, fails its sha256 check, or cannot be loaded by
            this torch version (the message says how to export it).
        ConfigError: an unknown device or precision, CUDA asked for but not available, fp16 asked for on CPU.
    """

    def __init__(self, model_dir: str | Path, meta: ModelJson | None = None, device: Device = "auto",
                 precision: Precision = "auto", cuda_graphs: bool = True, max_batch_size: int = 32,
                 threads: int | None = None, compile: bool = False, device_preprocess: bool = False) -> None:
        import torch

        self._torch = torch
        self.model_dir = Path(model_dir)
        self.meta = meta if meta is not None else load_package(self.model_dir, verify=False)
        self.device, self.precision = self._resolve_device(device, precision)
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        spec = self.meta.preprocess
        self.input_shape = (spec.channels, spec.crop, spec.crop)
        self.pixel_shape = (spec.crop, spec.crop, spec.channels)
        self.device_preprocess = bool(device_preprocess)
        self.num_classes = len(self.meta.labels)

        program = self._load_program()
        self.batch_range = _batch_range(program)
        if max_batch_size > self.batch_range[1]:
            log.warning("%s: the exported program accepts batches up to %d; max_batch_size %d clipped",
                        self.model_dir / PT2, self.batch_range[1], max_batch_size)
        self.max_batch_size = min(int(max_batch_size), self.batch_range[1])
        self.buckets = [b for b in batch_buckets(self.max_batch_size) if b >= self.batch_range[0]]
        self.cuda_graphs = bool(cuda_graphs) and self.device == "cuda"
        self.compiled = bool(compile)
        self.module = self._prepare_module(program.module())
        # (bucket, "float" or "pixels") -> (CUDAGraph, static input, static output)
        self._graphs: dict[tuple[int, str], tuple[Any, Any, Any]] = {}
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)
        self._pool = None
        self._lock = threading.Lock()  # static buffers and graphs are shared: one run at a time
        if self.device == "cuda":
            self._host_in = torch.empty((self.max_batch_size, *self.input_shape), dtype=torch.float32,
                                        pin_memory=True)
            self._host_out = torch.empty((self.max_batch_size, self.num_classes), dtype=torch.float32,
                                         pin_memory=True)
            self._host_px = torch.empty((self.max_batch_size, *self.pixel_shape), dtype=torch.uint8,
                                        pin_memory=True) if self.device_preprocess else None
        log.info("torch backend: %s on %s (%s%s%s%s), batch buckets %s", self.model_dir / PT2, self.device,
                 self.precision, ", channels_last" if self.device == "cuda" else "",
                 ", CUDA graphs" if self.cuda_graphs else "",
                 ", uint8 input normalised on the device" if self.device_preprocess else "", self.buckets)

    # -- set-up ------------------------------------------------------------------------------------------------------

    def _resolve_device(self, device: str, precision: str) -> tuple[str, str]:
        torch = self._torch
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
        if precision not in ("auto", "fp32", "fp16"):
            raise ConfigError(f"precision {precision!r} is not one of auto, fp32, fp16")
        has_cuda = torch.cuda.is_available()
        if device == "cuda" and not has_cuda:
            raise ConfigError("device 'cuda' asked for but torch sees no CUDA device "
                              f"(torch {torch.__version__}); use device='cpu' or 'auto'")
        resolved = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
        if precision == "auto":
            return resolved, "fp16" if resolved == "cuda" else "fp32"
        if resolved == "cpu" and precision == "fp16":
            if device == "cpu":
                raise ConfigError("precision 'fp16' needs a CUDA device (fp16 convolutions on CPU are slower than "
                                  "fp32); use precision='fp32' on CPU")
            log.warning("precision fp16 asked for but no CUDA device: running fp32 on CPU")
            precision = "fp32"
        return resolved, precision

    def _load_program(self) -> Any:
        """Check model.pt2's listing and sha256 through ltserve.package, then torch.export.load it."""
        path = self.model_dir / PT2
        entry = self.meta.files.get(PT2)
        if not path.is_file() or entry is None:
            what = "not found" if not path.is_file() else "not listed in model.json (cannot verify it)"
            raise PackageError(f"{path}: {what}; the torch backend needs it: {export_hint(self.model_dir)}, "
                               "or serve with the onnxruntime backend")
        verify_files(self.model_dir, self.meta.model_copy(update={"files": {PT2: entry}}))
        try:
            return self._torch.export.load(str(path))
        except Exception as exc:  # version skew or a foreign file: torch raises many types here
            raise PackageError(f"{path}: torch {self._torch.__version__} cannot load it ({type(exc).__name__}: "
                               f"{exc}); {export_hint(self.model_dir)}") from exc

    def _prepare_module(self, module: Any) -> Any:
        torch = self._torch
        if self.device == "cuda":
            # fixed shapes per bucket: let cuDNN time its algorithms once per shape
            torch.backends.cudnn.benchmark = True
            module = module.to("cuda", memory_format=torch.channels_last)
            if self.precision == "fp16":
                module = module.half()
        if self.compiled:
            mode = "max-autotune-no-cudagraphs" if self.device == "cuda" else "default"
            module = torch.compile(module, mode=mode, dynamic=False)
        return module

    def _forward(self, x32: Any) -> Any:
        """float32 NCHW on the runner's device -> float32 (N, C) logits (cast and layout inside, graph-capturable)."""
        torch = self._torch
        x = x32
        if self.device == "cuda":
            x = x.to(torch.float16 if self.precision == "fp16" else torch.float32)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x).float()

    def _normalize(self, pixels: Any) -> Any:
        """uint8 (N, H, W, C) on the device -> float32 (N, C, H, W): `preprocess.normalize_pixels` in torch."""
        x = pixels.to(self._torch.float32) * (1.0 / 255.0)  # a Python float: the same float32 multiply as NumPy's
        x = (x - self._mean) / self._std
        x = x.permute(0, 3, 1, 2)  # NCHW with channels_last strides: what the CUDA path wants anyway
        return x if self.device == "cuda" else x.contiguous()  # CPU: the same layout as the float path

    def _forward_kind(self, x: Any, kind: str) -> Any:
        """float32 NCHW ("float") or uint8 NHWC ("pixels") on the device -> float32 logits."""
        return self._forward(self._normalize(x) if kind == "pixels" else x)

    # -- public ------------------------------------------------------------------------------------------------------

    def warmup(self, batch_sizes: Iterable[int] | None = None) -> float:
        """Run (and on CUDA capture) every bucket that the given batch sizes fall into.

        Args:
            batch_sizes: batch sizes that will occur; None warms every bucket.

        Returns:
            seconds spent.
        """
        start = time.perf_counter()
        sizes = self.buckets if batch_sizes is None else sorted({self._bucket(min(int(n), self.max_batch_size))
                                                                  for n in batch_sizes})
        # largest first: smaller graphs then reuse the memory pool the largest one reserved
        for b in sorted(sizes, reverse=True):
            if self.device_preprocess:
                self.run_pixels(np.zeros((b, *self.pixel_shape), dtype=np.uint8))
            else:
                self.run(np.zeros((b, *self.input_shape), dtype=np.float32))
        if self.device == "cuda":
            self._torch.cuda.synchronize()
        return time.perf_counter() - start

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a preprocessed batch.

        Args:
            batch: float32 (N, C, crop, crop), N >= 1, normalised as model.json's preprocess says.

        Returns:
            float32 logits (N, num_classes).
        """
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape or batch.shape[0] < 1:
            c, h, w = self.input_shape
            raise ValueError(f"run expects float32 (N, {c}, {h}, {w}) with N >= 1, got {batch.shape}")
        return self._run(batch, "float")

    def run_pixels(self, pixels: Any) -> np.ndarray:
        """Logits of uint8 pixels before normalisation, normalised on the device (needs `device_preprocess`).

        Args:
            pixels: uint8 (N, crop, crop, C), N >= 1, as `ltserve.preprocess.stack_pixels` makes them: a NumPy
                array, or a torch tensor (one already on the runner's device is not copied through the host).

        Returns:
            float32 logits (N, num_classes).

        Raises:
            RuntimeError: the runner was made without `device_preprocess`.
            ValueError: wrong dtype or shape.
        """
        if not self.device_preprocess:
            raise RuntimeError("run_pixels needs a runner made with device_preprocess=True")
        if not isinstance(pixels, self._torch.Tensor):
            pixels = np.asarray(pixels)
        if pixels.dtype not in (np.uint8, self._torch.uint8) or tuple(pixels.shape[1:]) != self.pixel_shape \
                or pixels.shape[0] < 1:
            h, w, c = self.pixel_shape
            raise ValueError(f"run_pixels expects uint8 (N, {h}, {w}, {c}) with N >= 1, got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        return self._run(pixels, "pixels")

    def _run(self, batch: Any, kind: str) -> np.ndarray:
        step = self.max_batch_size
        with self._lock, self._torch.inference_mode():
            chunks = [self._run_chunk(batch[i:i + step], kind) for i in range(0, len(batch), step)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def device_latency_ms(self, batch_size: int, iters: int = 50) -> list[float]:
        """GPU time of one call with the input already on the device (no host copies), for benchmarks.

        Args:
            batch_size: rows; padded to its bucket as `run` would.
            iters: timed calls (CUDA events around each graph replay or forward).

        Returns:
            milliseconds per call, `iters` values.

        Raises:
            RuntimeError: the runner is not on CUDA.
        """
        torch = self._torch
        if self.device != "cuda":
            raise RuntimeError("device_latency_ms needs a CUDA runner")
        bucket = self._bucket(min(int(batch_size), self.max_batch_size))
        kind = "pixels" if self.device_preprocess else "float"
        times = []
        with self._lock, torch.inference_mode():
            if self.cuda_graphs:
                graph = self._graph(bucket, kind)[0]
                call = graph.replay
            else:
                x = self._zeros(bucket, kind)
                call = lambda: self._forward_kind(x, kind)  # noqa: E731
            call()
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(float(start.elapsed_time(end)))
        return times

    backend = "torch"

    @property
    def on_accelerator(self) -> bool:
        """Whether the model runs on a GPU."""
        return self.device == "cuda"

    @property
    def providers(self) -> list[str]:
        """Where it runs, in the shape of ONNX Runtime's provider list: ["torch:<device>:<precision>"]."""
        return [f"torch:{self.device}:{self.precision}"]

    def info(self) -> dict[str, Any]:
        """What runs: device, precision, CUDA graphs, buckets, where the input is normalised, torch version, GPU."""
        torch = self._torch
        return {"backend": "torch", "torch": torch.__version__, "device": self.device, "precision": self.precision,
                "cuda_graphs": self.cuda_graphs, "compile": self.compiled, "batch_buckets": self.buckets,
                "device_preprocess": self.device_preprocess,
                "gpu": torch.cuda.get_device_name(0) if self.device == "cuda" else None,
                "threads": torch.get_num_threads()}

    # -- internals ---------------------------------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return bucket_for(self.buckets, n)

    def _zeros(self, bucket: int, kind: str) -> Any:
        """A zero input of one bucket on the device: float32 NCHW ("float") or uint8 NHWC ("pixels")."""
        torch = self._torch
        if kind == "pixels":
            return torch.zeros((bucket, *self.pixel_shape), dtype=torch.uint8, device=self.device)
        return torch.zeros((bucket, *self.input_shape), dtype=torch.float32, device=self.device)

    def _run_chunk(self, chunk: Any, kind: str) -> np.ndarray:
        torch = self._torch
        n = len(chunk)
        on_device = isinstance(chunk, torch.Tensor) and chunk.device.type == self.device
        if not isinstance(chunk, torch.Tensor):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        if self.device == "cpu":
            if n < self.batch_range[0]:  # a program exported with a minimum batch: pad up to it
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch_range[0] - n, *chunk.shape[1:]))])
            return self._forward_kind(chunk, kind).numpy()[:n].copy()
        if on_device:
            src = chunk
        else:
            # torch's copy into pinned memory runs on the intra-op threads (a 256-image batch is 154 MB at 224 px
            # as float32, 38 MB as uint8 pixels)
            host = self._host_px if kind == "pixels" else self._host_in
            host[:n].copy_(chunk)
            src = host[:n]
        bucket = self._bucket(n)
        if self.cuda_graphs:
            graph, static_in, static_out = self._graph(bucket, kind)
            # rows n..bucket keep stale input: rows are independent (BN in eval mode) and sliced off below
            static_in[:n].copy_(src, non_blocking=True)
            graph.replay()
            out = static_out
        else:
            x = self._zeros(bucket, kind)
            x[:n].copy_(src, non_blocking=True)
            out = self._forward_kind(x, kind)
        self._host_out[:n].copy_(out[:n], non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return self._host_out[:n].numpy().copy()

    def _graph(self, bucket: int, kind: str = "float") -> tuple[Any, Any, Any]:
        """The CUDA graph of one bucket and input kind, captured on first use."""
        if (bucket, kind) in self._graphs:
            return self._graphs[bucket, kind]
        torch = self._torch
        start = time.perf_counter()
        static_in = self._zeros(bucket, kind)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuDNN autotuning and lazy allocations
            for _ in range(3):
                self._forward_kind(static_in, kind)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._forward_kind(static_in, kind)
        torch.cuda.synchronize()
        self._graphs[bucket, kind] = (graph, static_in, static_out)
        log.info("captured CUDA graph for batch %d (%s input) in %.2f s", bucket, kind, time.perf_counter() - start)
        return self._graphs[bucket, kind]


def _batch_range(program: Any) -> tuple[int, int]:
    """(min, max) batch size the exported program's guards accept; a static batch gives (B, B)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = set(program.graph_signature.user_inputs)
    node = next((n for n in placeholders if n.name in user_inputs), None)
    val = node.meta.get("val") if node is not None else None
    if val is None or not hasattr(val, "shape"):
        return 1, 1 << 16
    dim = val.shape[0]
    if isinstance(dim, int):
        return dim, dim
    expr = dim.node.expr
    for sym, vr in program.range_constraints.items():
        if sym == expr:
            lo = int(vr.lower) if str(vr.lower).lstrip("-").isdigit() else 1
            hi = int(vr.upper) if str(vr.upper).isdigit() else 1 << 16
            return max(lo, 1), hi
    return 1, 1 << 16
