"""The ONNX Runtime runner: a package's `model.onnx` in a session with explicit providers and threads.

Runners share one interface with `ltserve.runtime.torch_runner.TorchRunner`: `run(batch) -> logits`, `info()`,
`buckets`, `max_batch_size`, `on_accelerator`; this one also has `run_outputs(batch) -> (logits, features | None)`
(the graph's `features` output, model.json `features_name`, when the package has one). Batches are padded to power-of-two buckets up to `max_batch_size`
(a batch of 5 runs as 8, the outputs are sliced), so a serving process never meets a new input shape after warm-up.
No torch here; onnxruntime is the serving extra.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.errors import ConfigError, MissingDependency, PackageError, unknown_choice
from ltserve.package import ModelJson
from ltserve.runtime.buckets import batch_buckets, bucket_for, pad_to

try:  # the serving extra: `pip install ".[cpu]"` or `".[gpu]"`
    import onnxruntime as ort
except ImportError:  # reported when a runner is built, so `ltserve --help` still works without it
    ort = None

logger = logging.getLogger(__name__)


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


class OnnxRunner:
    """Runs a package's `model.onnx` with ONNX Runtime: float32 NCHW batches in, float32 logits out.

    Args:
        model_dir: the package folder.
        meta: its verified `ModelJson`.
        providers: ONNX Runtime providers or aliases, best first (None: the best available); a warning is logged
            when the session falls back from the first one asked for.
        threads: intra-op CPU threads; None uses os.cpu_count(). With several worker processes, give each
            cores / workers.
        max_batch_size: the largest batch one session call runs.
        provider_options: options per provider name, e.g. {"TensorrtExecutionProvider": {"trt_fp16_enable": True}}.

    Raises:
        MissingDependency: onnxruntime is not installed.
        PackageError: the graph cannot be loaded or does not match model.json.
        ConfigError: an unknown provider.
    """

    backend = "onnxruntime"

    def __init__(self, model_dir: str | Path, meta: ModelJson, *, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, max_batch_size: int = 32,
                 provider_options: dict[str, dict[str, Any]] | None = None) -> None:
        _require_ort()
        self.model_dir, self.meta = Path(model_dir), meta
        self.threads = int(threads or os.cpu_count() or 1)
        self.max_batch_size = int(max_batch_size)
        self.buckets = batch_buckets(self.max_batch_size)
        self.requested_providers = resolve_providers(providers)
        self.session = self._build_session(provider_options or {})
        self.providers = list(self.session.get_providers())
        if self.providers[0] != self.requested_providers[0]:
            logger.warning("%s: asked for %s but ONNX Runtime runs on %s (fell back)", self.model_dir,
                           self.requested_providers[0], self.providers[0])
        self._input_dtype = self._check_graph()
        self.features_name: str | None = meta.features_name

    @property
    def on_accelerator(self) -> bool:
        """Whether the session runs on a GPU (CUDA or TensorRT provider)."""
        return self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    def run(self, chunk: np.ndarray) -> np.ndarray:
        """Logits (N, C) float32 of float32 (N, C_in, H, W), 1 <= N <= max_batch_size (padded to its bucket)."""
        n = len(chunk)
        x = np.ascontiguousarray(pad_to(chunk, bucket_for(self.buckets, n)), dtype=self._input_dtype)
        (logits,) = self.session.run([self.meta.output_name], {self.meta.input_name: x})
        return np.asarray(logits[:n], dtype=np.float32)

    def run_outputs(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, C), features (N, D) or None when the graph has no features output), float32; one run."""
        if self.features_name is None:
            return self.run(chunk), None
        n = len(chunk)
        x = np.ascontiguousarray(pad_to(chunk, bucket_for(self.buckets, n)), dtype=self._input_dtype)
        logits, features = self.session.run([self.meta.output_name, self.features_name], {self.meta.input_name: x})
        return np.asarray(logits[:n], dtype=np.float32), np.asarray(features[:n], dtype=np.float32)

    def metadata(self) -> dict[str, str]:
        """The graph file's metadata entries (ModelProto.metadata_props), e.g. the open-set feature statistics."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def info(self) -> dict[str, Any]:
        """What runs: backend, providers (the first one is used), threads."""
        return {"backend": self.backend, "providers": self.providers, "threads": self.threads}

    def _build_session(self, provider_options: dict[str, dict[str, Any]]) -> Any:
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
            return ort.InferenceSession(str(path), sess_options=opts, providers=self.requested_providers,
                                        provider_options=[provider_options.get(p, {}) for p in self.requested_providers])
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
        spec, num_classes = self.meta.preprocess, len(self.meta.labels)
        want = (spec.channels, spec.crop, spec.crop)
        shape = list(inp.shape)
        if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want)):
            raise PackageError(f"{path}: graph input shape {shape} does not match model.json preprocess "
                               f"(N, {want[0]}, {want[1]}, {want[2]})")
        if isinstance(shape[0], int) and (shape[0] != 1 or self.max_batch_size > 1):
            raise PackageError(f"{path}: graph batch dimension is fixed to {shape[0]} (max_batch_size "
                               f"{self.max_batch_size}); re-export with a dynamic batch (batch-1 graphs need "
                               "max_batch_size=1)")
        out_shape = list(outputs[self.meta.output_name].shape)
        if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != num_classes):
            raise PackageError(f"{path}: graph output shape {out_shape} does not match the {num_classes} "
                               "labels in model.json")
        if self.meta.features_name is not None:
            feat = outputs.get(self.meta.features_name)
            if feat is None or len(feat.shape) != 2:
                raise PackageError(f"{path}: model.json names the features output {self.meta.features_name!r} but "
                                   f"the graph has {sorted(outputs)}; re-export the package")
        return np.dtype(np.float16) if inp.type == "tensor(float16)" else np.dtype(np.float32)

