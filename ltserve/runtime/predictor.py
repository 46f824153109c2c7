"""The Predictor: the one inference path shared by the service, the batch CLI, package evaluation and benchmarks.

    images (bytes) --decode--> uint8 (crop, crop, C) --preprocess--> float32 NCHW --predict--> logits (N, C)
                   --postprocess--> list[Prediction]

With the torch runner's `device_preprocess` on, `preprocess` stops at the uint8 pixels (N, crop, crop, C) and the
runner normalises them on its device; the Predictor checks that path against the host's normalisation once at
start-up and uses it only when the logits agree (`info()["runtime"]["preprocess_on"]` says which path runs).
`predict` takes either kind of batch whatever the runner.

Open-set rejection (`ltserve.open_set`, model.json `open_set`): `open_set="off" | "flag" | "reject"` (default flag
when the package has thresholds, else off). `predict_outputs(batch) -> (logits, features | None)` also returns the
graph's penultimate features (ONNX Runtime, packages exported with them); `postprocess(logits, top_k,
features=features)` then adds `unknown` and `ood_score` to every Prediction (and, with reject, answers an unknown
image's label null). A logit score (msp, energy, max_logit) needs no features.

A model package (`model.onnx` + `model.json`) is loaded and verified (schema, every sha256) once, and a runner is
picked from `RUNNERS`: ONNX Runtime (`model.onnx`), or PyTorch (`model.pt2`, for GPU machines with torch and no
onnxruntime-gpu). Every batch size the runner will run is warmed up once and timed (`bucket_ms`), so a serving
process never meets a new input shape after start-up and the server's batcher knows what each batch size costs.

NumPy, Pillow, pydantic and onnxruntime only: torch is imported only for the torch runner.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.errors import ConfigError, PackageError, unknown_choice
from ltserve.metrics import ShotGroup
from ltserve.open_set import FEATURE_SCORES, FeatureStats, Scorer, check_mode
from ltserve.package import ModelJson, load_package
from ltserve.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode, normalize_pixels, stack_pixels
from ltserve.runtime.buckets import bucket_for
from ltserve.runtime.prediction import Prediction, postprocess

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch")


def make_runner(backend: str, model_dir: Path, meta: ModelJson, *, providers: Sequence[str] | str | None,
                threads: int | None, max_batch_size: int, torch_options: dict[str, Any] | None) -> Any:
    """The runner of `backend`: an `OnnxRunner` or a `TorchRunner` (imported only when asked for: torch)."""
    if backend == "onnxruntime":
        from ltserve.runtime.onnx_runner import OnnxRunner

        return OnnxRunner(model_dir, meta, providers=providers, threads=threads, max_batch_size=max_batch_size)
    if backend == "torch":
        from ltserve.runtime.torch_runner import TorchRunner

        return TorchRunner(model_dir, meta, threads=threads, max_batch_size=max_batch_size, **(torch_options or {}))
    raise ConfigError(unknown_choice("backend", backend, BACKENDS))


class Predictor:
    """Loads a verified model package, runs it on a runner, and classifies images.

    Args:
        model_dir: a model package folder (`model.onnx`, `model.json`; `model.pt2` for the torch backend).
        providers: ONNX Runtime providers or aliases, best first (None: the best available; onnxruntime only).
        threads: CPU threads of the runner (intra-op); None: os.cpu_count() for ONNX Runtime, torch's default for
            torch. With several worker processes, give each cores / workers.
        max_batch_size: the largest batch one runner call runs; larger inputs to `predict` are split.
        backend: "onnxruntime", or "torch": the package's `model.pt2` through PyTorch (CUDA, fp16, CUDA graphs per
            bucket; needs `ltserve export ... --model-format onnx,pt2`).
        torch_options: the torch runner's device, precision, cuda_graphs, compile, device_preprocess (see
            `TorchRunner`).
        open_set: "off", "flag" (every answer carries `unknown` and `ood_score`) or "reject" (an unknown image also
            answers label null); None: "flag" when the package has open-set thresholds, else "off".

    Raises:
        PackageError: the package is missing, invalid, fails its sha256 check, or its graph does not match
            model.json (input/output names, channels, size, classes).
        MissingDependency: onnxruntime (or torch) is not installed.
        ConfigError: an unknown backend or provider, or a bad max_batch_size / threads, an unknown open_set mode,
            or "flag" / "reject" for a package without open-set thresholds (or a feature score on a runner
            without the features output: the torch backend).
    """

    def __init__(self, model_dir: str | Path, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, max_batch_size: int = 32, backend: str = "onnxruntime",
                 torch_options: dict[str, Any] | None = None, open_set: str | None = None) -> None:
        if open_set is not None:
            check_mode(open_set, "open_set")
        if backend not in BACKENDS:
            raise ConfigError(unknown_choice("backend", backend, BACKENDS))
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1 (or None for os.cpu_count()), got {threads}")
        self.model_dir = Path(model_dir)
        self.meta: ModelJson = load_package(self.model_dir)
        self.spec: PreprocessSpec = self.meta.preprocess
        self.labels: list[str] = list(self.meta.labels)
        self.shot_groups: list[ShotGroup] = list(self.meta.shot_groups)
        self.num_classes = len(self.labels)
        self.backend = backend
        self.runner = make_runner(backend, self.model_dir, self.meta, providers=providers, threads=threads,
                                  max_batch_size=max_batch_size, torch_options=torch_options)
        self.max_batch_size = self.runner.max_batch_size
        self.buckets: list[int] = list(self.runner.buckets)
        self.providers: list[str] = list(self.runner.providers)
        self.threads: int | None = self.runner.info().get("threads")
        self.open_set_mode, self.feature_stats = self._open_set(open_set)
        self.device_preprocess_check: dict[str, Any] | None = self._check_device_preprocess()
        self.warmup_s = self._warm_up()
        logger.info("loaded %s (%s, %s, %d classes) on %s, batch buckets %s, warm-up %.2f s", self.model_dir,
                    self.meta.name, self.meta.graph.precision, self.num_classes, self.providers[0], self.buckets,
                    self.warmup_s)

    def _open_set(self, mode: str | None) -> tuple[str, FeatureStats | None]:
        """The open-set mode and the feature statistics its score needs (checked against the package)."""
        section = self.meta.open_set
        self._thresholds = np.asarray(section.thresholds if section is not None else [], dtype=np.float64)
        self._scorer: Scorer | None = None
        if section is None:
            if mode not in (None, "off"):
                raise ConfigError(f"{self.model_dir}: open_set={mode!r} needs a package with open-set thresholds "
                                  "(model.json `open_set`, written by `ltserve export` since open-set rejection); "
                                  "re-export the package, or use open_set='off'")
            return "off", None
        needs_features = section.score in FEATURE_SCORES
        if needs_features and getattr(self.runner, "features_name", None) is None:
            if mode not in (None, "off"):
                raise ConfigError(f"{self.model_dir}: the package's open-set score {section.score!r} needs the "
                                  f"graph's features output, which the {self.backend} runner does not give; use "
                                  "backend='onnxruntime' or open_set='off'")
            logger.warning("%s: open-set score %s needs features the %s runner does not give: open-set off",
                           self.model_dir, section.score, self.backend)
            return "off", None
        stats = None
        if section.stats_key is not None and getattr(self.runner, "features_name", None) is not None:
            text = self.runner.metadata().get(section.stats_key)
            try:
                stats = FeatureStats.from_text(text or "")
            except ValueError as exc:
                raise PackageError(f"{self.model_dir / 'model.onnx'}: metadata {section.stats_key!r}: {exc}; "
                                   "re-export the package") from None
        self._scorer = Scorer(section.score, stats if needs_features else None)
        return (mode or "flag"), stats

    @property
    def on_accelerator(self) -> bool:
        """Whether the model runs on a GPU: then the CPU cores are free for decoding uploads."""
        return bool(self.runner.on_accelerator)

    @property
    def pixel_input(self) -> bool:
        """Whether `preprocess` stops at uint8 pixels because the runner normalises on its device."""
        return bool(getattr(self.runner, "device_preprocess", False))

    def _check_device_preprocess(self, rows: int = 8, seed: int = 0) -> dict[str, Any] | None:
        """Before the runner's device-side normalisation is used, compare it with the host's on random pixels.

        Logits must agree to 1e-3 (fp32) or 2e-2 (fp16) times max(1, the largest |logit|); otherwise the runner falls
        back to float32 input normalised on the host, with a warning, and `info()` says why.

        Returns:
            None when the runner has no device path; else {"passed", "max_abs_diff", "tolerance", "rows"}.
        """
        if not self.pixel_input:
            return None
        n = self.bucket_for(min(rows, self.max_batch_size))
        pixels = np.random.default_rng(seed).integers(0, 256, size=(n, self.spec.crop, self.spec.crop,
                                                                      self.spec.channels), dtype=np.uint8)
        exact = self.runner.run(normalize_pixels(pixels, self.spec))
        fast = self.runner.run_pixels(pixels)
        diff = float(np.abs(exact - fast).max())
        tol = (2e-2 if self.runner.precision == "fp16" else 1e-3) * max(1.0, float(np.abs(exact).max()))
        passed = bool(np.isfinite(diff) and diff <= tol)
        if not passed:
            logger.warning("device-side preprocessing disagrees with the host's (max |logit diff| %.3g > %.3g): "
                           "normalising on the host instead", diff, tol)
            self.runner.device_preprocess = False
        return {"passed": passed, "max_abs_diff": diff, "tolerance": tol, "rows": n}

    def _warm_up(self) -> float:
        """Run every bucket so that no request pays for a first-shape plan or allocation, and time each one.

        `bucket_ms[b]` is the time of a second run at batch b (the first pays for plans and allocations), in ms:
        what one call of that size costs here. The server's batcher uses it to run the batch size with the most
        images per second.
        """
        start = time.perf_counter()
        c, s = self.spec.channels, self.spec.crop
        self.bucket_ms: dict[int, float] = {}
        # the kind of batch `preprocess` will hand over: uint8 NHWC pixels or float32 NCHW
        run = self.runner.run_pixels if self.pixel_input else self.runner.run
        for b in self.buckets:
            x = np.zeros((b, s, s, c), dtype=np.uint8) if self.pixel_input else np.zeros((b, c, s, s), np.float32)
            run(x)
            t0 = time.perf_counter()
            run(x)
            self.bucket_ms[b] = (time.perf_counter() - t0) * 1000.0
        return time.perf_counter() - start

    def bucket_for(self, n: int) -> int:
        """The batch size a chunk of n <= max_batch_size images runs at (n padded up to a bucket)."""
        return bucket_for(self.buckets, n)

    # -- the four steps ----------------------------------------------------------------------------------------------

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Image bytes (JPEG, PNG, WebP, BMP, GIF, TIFF, PNM) -> uint8 (crop, crop, C) with this package's spec."""
        return decode(data, self.spec, max_pixels)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (crop, crop, C) images -> normalised float32 (N, C, crop, crop); or, when the runner normalises on
        its device (`pixel_input`), the stacked uint8 pixels (N, crop, crop, C)."""
        pixels = stack_pixels(images, self.spec)
        return pixels if self.pixel_input else normalize_pixels(pixels, self.spec)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a preprocessed batch (`predict_outputs` also gives the penultimate features).

        Args:
            batch: float32 (N, C, crop, crop), or uint8 pixels (N, crop, crop, C) before normalisation (what
                `preprocess` returns when the runner normalises on its device; normalised here otherwise); N >= 1,
                any N (split into max_batch_size chunks, each padded to its bucket).

        Returns:
            float32 logits (N, num_classes).
        """
        batch = np.asarray(batch)
        c, s = self.spec.channels, self.spec.crop
        if batch.dtype == np.uint8 and batch.ndim == 4 and batch.shape[1:] == (s, s, c) and batch.shape[0] >= 1:
            if not self.pixel_input:
                batch = normalize_pixels(batch, self.spec)
        else:
            batch = batch.astype(np.float32, copy=False)
            if batch.ndim != 4 or batch.shape[1:] != (c, s, s) or batch.shape[0] < 1:
                raise ValueError(f"predict expects float32 (N, {c}, {s}, {s}) or uint8 (N, {s}, {s}, {c}) with "
                                 f"N >= 1, got {batch.dtype} {batch.shape}")
        run = self.runner.run_pixels if batch.dtype == np.uint8 else self.runner.run
        step = self.max_batch_size
        chunks = [run(batch[i:i + step]) for i in range(0, len(batch), step)]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def predict_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, num_classes) and the penultimate features (N, D) of a preprocessed batch, in one run.

        Features are None when the runner cannot give them: a package without the features output, the torch
        backend, or uint8 pixels normalised on the device. Takes what `predict` takes.
        """
        batch = np.asarray(batch)
        run_outputs = getattr(self.runner, "run_outputs", None)
        if run_outputs is None or getattr(self.runner, "features_name", None) is None or batch.dtype == np.uint8:
            return self.predict(batch), None
        c, s = self.spec.channels, self.spec.crop
        batch = batch.astype(np.float32, copy=False)
        if batch.ndim != 4 or batch.shape[1:] != (c, s, s) or batch.shape[0] < 1:
            raise ValueError(f"predict_outputs expects float32 (N, {c}, {s}, {s}) or uint8 (N, {s}, {s}, {c}) with "
                             f"N >= 1, got {batch.dtype} {batch.shape}")
        step = self.max_batch_size
        parts = [run_outputs(batch[i:i + step]) for i in range(0, len(batch), step)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def open_set_scores(self, logits: np.ndarray, features: np.ndarray | None = None,
                        ) -> tuple[np.ndarray, np.ndarray] | None:
        """(ood_score (N,) float64, unknown (N,) bool) of the package's score and thresholds, or None when the
        package has no open-set section or the score needs features and `features` is None."""
        if self._scorer is None or (self._scorer.needs_features and features is None):
            return None
        logits = np.asarray(logits)
        score = self._scorer(logits, features)
        return score, score > self._thresholds[logits.argmax(axis=1)]

    def postprocess(self, logits: np.ndarray, top_k: int = 5, answer: type[Prediction] = Prediction,
                    features: np.ndarray | None = None, scored_logits: np.ndarray | None = None,
                    **fields: Any) -> list[Prediction]:
        """Softmax (float64, then float) and the top-k classes of every row; see `postprocess`.

        With open-set on (`open_set_mode` flag or reject) every answer also gets `ood_score` and `unknown`; a
        feature score needs `features` (from `predict_outputs`): without them, flag answers leave both None (logged
        once) and reject raises ValueError, as it cannot reject. `scored_logits`: the logits the open-set score is
        computed from when they are not `logits` (the model's own, before a live-prior shift: the thresholds were
        calibrated on those).
        """
        if self.open_set_mode == "off":
            return postprocess(logits, self.labels, self.shot_groups, top_k, answer, **fields)
        result = self.open_set_scores(logits if scored_logits is None else scored_logits, features)
        if result is None:
            if self.open_set_mode == "reject":
                raise ValueError(f"open-set score {self.meta.open_set.score!r} needs the features: pass "
                                 "features= from predict_outputs(batch)")
            if not getattr(self, "_warned_features", False):
                self._warned_features = True
                logger.warning("postprocess without features: open-set score %s not computed (call "
                               "predict_outputs and pass features=)", self.meta.open_set.score)
            return postprocess(logits, self.labels, self.shot_groups, top_k, answer, **fields)
        score, unknown = result
        return postprocess(logits, self.labels, self.shot_groups, top_k, answer, ood_score=score, unknown=unknown,
                           reject=self.open_set_mode == "reject", **fields)

    # -- conveniences ------------------------------------------------------------------------------------------------

    def classify(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[Prediction]:
        """uint8 (crop, crop, C) images -> predictions (preprocess, predict_outputs, postprocess)."""
        logits, features = self.predict_outputs(self.preprocess(images))
        return self.postprocess(logits, top_k, features=features)

    def classify_bytes(self, data: Sequence[bytes], top_k: int = 5,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
        """Encoded images -> predictions.

        Raises:
            InvalidImage, UnsupportedFormat, ImageTooLarge: for the first file that cannot be used.
        """
        return self.classify([self.decode(d, max_pixels) for d in data], top_k)

    def jpeg_draft(self) -> dict[str, Any]:
        """Whether `decode` runs JPEG draft decoding (`PreprocessSpec.allow_draft`) and the export's reason:
        {"on": bool, "mode", "reason", "images_affected", "top1_agreement_vs_exact", "accuracy_change" (what
        model.json recorded; "reason" only, for a package exported before the check)}."""
        r = self.meta.verification.get("jpeg_draft") or {
            "reason": "not checked: exported before ltserve checked it"}
        keep = ("mode", "reason", "images_affected", "top1_agreement_vs_exact", "accuracy_change")
        return {"on": bool(self.spec.allow_draft), **{k: r[k] for k in keep if k in r}}

    def open_set_info(self) -> dict[str, Any]:
        """{"mode", "score", "chosen_by", "target", "thresholds" (per class), "threshold_source", "group_thresholds",
        "features_output", "val_accepted"}; {"mode": "off", "score": None} for a package without open-set."""
        o = self.meta.open_set
        if o is None:
            return {"mode": "off", "score": None, "features_output": self.meta.features_name}
        return {"mode": self.open_set_mode, "score": o.score, "chosen_by": o.chosen_by, "target": o.target,
                "thresholds": dict(zip(self.labels, o.thresholds)), "threshold_source": dict(zip(self.labels,
                                                                                               o.threshold_source)),
                "group_thresholds": o.group_thresholds, "features_output": self.meta.features_name,
                "val_accepted": o.val_accepted}

    def info(self) -> dict[str, Any]:
        """What the package and this runner are: precision, labels, shot groups, preprocessing and whether JPEG
        draft decoding runs, head, metrics, provenance, runtime, open-set rejection (`open_set_info`)."""
        m = self.meta
        runner = self.runner.info()
        runtime = {"backend": self.backend, "providers": self.providers, "threads": self.threads,
                   **({"torch": runner} if self.backend == "torch" else {}),
                   # which path runs: "host" (float32 NCHW normalised by NumPy) or the runner's device
                   "preprocess_on": runner.get("device", "host") if self.pixel_input else "host",
                   **({"device_preprocess_check": self.device_preprocess_check}
                      if self.device_preprocess_check is not None else {}),
                   "batch_buckets": self.buckets, "warmup_s": round(self.warmup_s, 4),
                   "bucket_ms": {str(b): round(t, 4) for b, t in self.bucket_ms.items()}}
        return {
            "name": m.name,
            # what runs: model.onnx's weights (fp32, fp16, int8), or the torch runner's (model.pt2 is always fp32)
            "precision": m.graph.precision if self.backend == "onnxruntime" else runner.get("precision"),
            "labels": m.labels,
            "class_counts": m.class_counts,
            "shot_groups": m.shot_groups,
            "shot_thresholds": m.shot_thresholds.model_dump(),
            "preprocess": self.spec.model_dump(mode="json"),
            "jpeg_draft": self.jpeg_draft(),
            "head": m.head.model_dump(mode="json"),
            "metrics": m.metrics,
            "verification": m.verification,
            "graph": m.graph.model_dump(mode="json"),
            "provenance": m.provenance.model_dump(mode="json"),
            "runtime": runtime,
            "open_set": self.open_set_info(),
        }
