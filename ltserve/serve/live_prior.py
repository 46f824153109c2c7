"""The live class prior of a server's traffic (LTSERVE_PRIOR_ADAPT=off | report | apply), shared by its workers.

Predict -> logits -> `LivePrior.adapt` -> answer: every answer's unadapted logits go into this worker's
`LiveEstimator` window (`ltserve.runtime.prior`), a copy under a lock; with `apply`, each batch is answered with
the shift the estimate had before it (log(pi_live / pi_src), dead band, cap; nothing below the sample floor), and
every answer says whether it was adapted. Re-estimating (EM or BBSE over the server-wide window; auto picks one per
package at start) runs in this worker's background thread, woken every `every` images and at most every
`REFRESH_MIN_S`, never on the event loop; the same thread writes this worker's state and applies resets.

Several workers, one estimate (`ltserve.serve.prior_files`): each worker writes its window to its own file, and a
re-estimate merges its window with the others' files, keeping the newest `window` images by time: the last N images
whichever worker served them, never counted twice. A worker restarted with the same index loads its own file; other
workers' files lag by at most `persist_s`. POST /prior/reset writes a marker that every worker applies within a
second. Prometheus: `ltserve_prior_estimate{label}` (one series per class of the package, so the label values are
bounded), `ltserve_prior_distance` (total variation from the target prior), `ltserve_prior_images` (images in the
estimate) and `ltserve_prior_adapted` (answers adapted).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from ltserve.package import ModelJson
from ltserve.runtime import Prediction
from ltserve.runtime.prior import (EstimatorSettings, LiveEstimator, PackagePrior, adapt_logits, check_method,
                                   tv_distance)
from ltserve.serve.prior_files import PriorFiles, default_state_dir

logger = logging.getLogger(__name__)

MODES = ("off", "report", "apply")
_RESET_CHECK_S = 1.0
REFRESH_MIN_S = 0.25
"""Least time between two re-estimates of one worker: under heavy traffic `every` images come in milliseconds."""


class LivePrediction(Prediction):
    """A service answer with label-shift adaptation on (report or apply): the Prediction plus `adapted`."""

    adapted: bool = Field(False, description="whether the logits were shifted to the estimated live class prior "
                                      "(LTSERVE_PRIOR_ADAPT=apply, past the sample floor and the dead band)")


class LivePrior:
    """One worker's view of the server's live prior: observe, adapt, persist, merge, reset, report.

    Args:
        meta: the package's model.json.
        settings: the estimator's window, decay, floor, smoothing, cap, dead band and method.
        mode: "report" (estimate only) or "apply" (also shift the logits).
        state_dir: the server's state folder (created).
        worker: this worker's name in its state file (BentoML's worker index).
        persist_s: longest time between two writes of this worker's state file.
        metrics: the Prometheus metrics of `prior_metrics`, or None.
    """

    def __init__(self, meta: ModelJson, settings: EstimatorSettings, mode: str, state_dir: Path, worker: str,
                 persist_s: float = 5.0, metrics: dict[str, Any] | None = None) -> None:
        if mode not in ("report", "apply"):
            raise ValueError(f"LivePrior runs in mode report or apply, got {mode!r}")
        self.mode, self.labels, self.metrics = mode, list(meta.labels), metrics
        self.files = PriorFiles(state_dir, worker, meta.files["model.onnx"].sha256, len(self.labels))
        self.state_dir, self.persist_s = self.files.state_dir, float(persist_s)
        self.package = PackagePrior.from_meta(meta)
        # an auto method is resolved here, once per worker (the same package gives every worker the same answer)
        self.live = LiveEstimator(self.package, settings, others=self.files.others, setting="LTSERVE_PRIOR_METHOD")
        logger.info("live prior (%s): estimator %s; %s", mode, self.live.method, self.live.method_reason)
        self.adapted = 0  # answers adapted by this worker
        self._lock = threading.Lock()
        self._next_reset_check = 0.0
        self._last_persist = time.monotonic()
        self._dirty = False
        self._check_reset(force=True)
        self._load_own()
        with self._lock:
            self._refresh()
        # persistence off the request path: an idle worker still writes what it saw and applies a reset
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by the request path when a re-estimate is due
        self._thread = threading.Thread(target=self._background, name="ltserve-prior", daemon=True)
        self._thread.start()

    # -- the request path --------------------------------------------------------------------------------------------

    def adapt(self, logits: np.ndarray) -> tuple[np.ndarray, bool]:
        """Observe a batch's unadapted logits (N, C); return the logits to answer with and whether they are shifted.

        The request path's share of the work: copy the rows into the window and read the current shift (apply mode,
        past the floor and the dead band); at most once a second, look for a reset another worker wrote, so that
        the next answer after a reset is counted from it whatever the background thread is doing. Re-estimating (EM or BBSE over the merged window, reading the other
        workers' files) runs in this worker's background thread, woken when `every` new images have come and at
        most every `REFRESH_MIN_S`: never on the event loop.
        """
        with self._lock:
            if time.monotonic() >= self._next_reset_check:  # another worker's reset, at most one stat a second
                self._check_reset()
            shift = self.live.shift if self.mode == "apply" else None
            due = self.live.record(logits)
            self._dirty = True
            if shift is not None:
                self.adapted += len(logits)
        if due:
            self._wake.set()
        if shift is None:
            return logits, False
        if self.metrics is not None:
            self.metrics["adapted"].inc(len(logits))
        return adapt_logits(logits, shift), True

    # -- reports and control -----------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """GET /prior: the server-wide estimate (this worker's window merged with the others' files), with its
        confidence, the distance from the target prior and the shift apply would add."""
        with self._lock:
            self._check_reset()
            est = self._refresh(confidence=True)
            shift = self.live.shift
            predicted = np.zeros(len(self.labels), dtype=np.int64)
            others = self.files.others()
            for p, t in [self.live.window.samples(probabilities=True), *others]:
                keep = np.asarray(t) >= self.live.since
                if keep.any():
                    predicted += np.bincount(np.asarray(p)[keep].argmax(axis=1), minlength=len(self.labels))
            workers = 1 + len(others)
        s = self.live.settings
        classes = []
        for j, label in enumerate(self.labels):
            classes.append({"label": label, "estimate": float(est.prior[j]), "target": float(self.package.target[j]),
                            "predicted": int(predicted[j]),
                            "std": None if est.std is None else float(est.std[j]),
                            "shift": None if shift is None else round(float(shift[j]), 6)})
        return {
            "mode": self.mode, "method": self.live.method, "method_setting": s.method,
            "method_reason": self.live.method_reason, "estimated": est.estimated,
            "adapting": self.mode == "apply" and shift is not None, "n": int(est.n),
            "n_effective": round(float(est.n_effective), 2), "target_kind": self.package.kind,
            "distance": {"total_variation": tv_distance(est.prior, self.package.target)},
            "expected_tv_error": est.expected_tv_error, "classes": classes,
            "settings": {"window": s.window, "half_life": s.half_life, "min_samples": s.min_samples,
                         "pseudo_count": s.pseudo_count, "max_shift": s.max_shift, "dead_band": s.dead_band,
                         "every": s.every},
            "reset_at": self.live.since or None, "workers": workers, "state_dir": str(self.state_dir),
            **({"reason": est.extra["reason"]} if "reason" in est.extra else {}),
            **({"condition_number": est.extra["condition_number"]} if "condition_number" in est.extra else {}),
        }

    def model_info(self) -> dict[str, Any]:
        """What GET /model says about the live prior: its state folder and the estimator in use (auto resolved)."""
        return {"prior_state_dir": str(self.state_dir), "prior_method": self.live.method,
                "prior_method_setting": self.live.settings.method, "prior_method_reason": self.live.method_reason}

    def reset(self) -> dict[str, Any]:
        """Forget every image served so far, in every worker: write reset.json, clear this worker at once."""
        at = time.time()
        self.files.write_reset(at)
        with self._lock:
            self._check_reset(force=True)
            self._persist()
        logger.info("live prior reset at %.3f: back to the target prior (%s)", at, self.package.kind)
        return self.report()

    def close(self) -> None:
        """Stop the background thread and write this worker's state (shutdown)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self._dirty:
                self._persist()

    def _background(self) -> None:
        """Re-estimate when woken (`every` new images), at most every REFRESH_MIN_S; every second apply a reset
        another worker wrote; write the state when it changed, at most every persist_s."""
        last_refresh = 0.0
        while not self._stop.is_set():
            self._wake.wait(_RESET_CHECK_S)
            if self._stop.is_set():
                return
            try:
                now = time.monotonic()
                with self._lock:
                    if now >= self._next_reset_check:
                        self._check_reset()
                    if self._wake.is_set() and now - last_refresh >= REFRESH_MIN_S:
                        self._wake.clear()
                        self._refresh()
                        last_refresh = now
                    if self._dirty and now - self._last_persist >= self.persist_s:
                        self._persist()
            except Exception:  # noqa: BLE001 - the estimate must never take the worker down
                logger.exception("live prior: background step failed; retrying in %.1f s", _RESET_CHECK_S)
            if self._wake.is_set():  # due, but refreshed less than REFRESH_MIN_S ago
                self._stop.wait(REFRESH_MIN_S)

    # -- internals (the lock is held) ----------------------------------------------------------------------------------

    def _refresh(self, confidence: bool = False) -> Any:
        est = self.live.refresh(confidence=confidence)
        self._published()
        return est

    def _published(self) -> None:
        if self.metrics is None:
            return
        est = self.live.estimate
        for label, share in zip(self.labels, est.prior):
            self.metrics["estimate"].labels(label=label).set(float(share))
        self.metrics["distance"].set(tv_distance(est.prior, self.package.target))
        self.metrics["images"].set(est.n)

    def _check_reset(self, force: bool = False) -> None:
        """Apply a reset another worker (or this one) wrote; at most once a second unless forced."""
        self._next_reset_check = time.monotonic() + _RESET_CHECK_S
        at = self.files.read_reset(force)
        if at is not None and at > self.live.since:
            self.live.reset(at)
            self._published()
            self._dirty = True

    def _persist(self) -> None:
        logits, times = self.live.window.samples()
        self.files.write(logits, times, self.live.window.total)
        self._last_persist = time.monotonic()
        self._dirty = False

    def _load_own(self) -> None:
        saved = self.files.load_own()
        if saved is None:
            return
        logits, times, total = saved
        keep = times >= self.live.since
        self.live.window.load(logits[keep], times[keep], total)
        logger.info("%s: live prior state loaded (%d images)", self.files.path, int(keep.sum()))


_METRICS: dict[str, Any] = {}


def prior_metrics() -> dict[str, Any]:
    """The live prior's Prometheus metrics (created once per process, inside the worker, like `service_metrics`).

    The gauges hold the most recent value any worker published (multiprocess mode "mostrecent"): every worker
    publishes the same server-wide estimate.
    """
    if not _METRICS:
        import prometheus_client

        _METRICS["estimate"] = prometheus_client.Gauge(
            "ltserve_prior_estimate", "Estimated live class prior, per class of the package", ["label"],
            multiprocess_mode="mostrecent")
        _METRICS["distance"] = prometheus_client.Gauge(
            "ltserve_prior_distance", "Total-variation distance of the live prior estimate from the target prior",
            multiprocess_mode="mostrecent")
        _METRICS["images"] = prometheus_client.Gauge(
            "ltserve_prior_images", "Images the live prior estimate is computed from", multiprocess_mode="mostrecent")
        _METRICS["adapted"] = prometheus_client.Counter(
            "ltserve_prior_adapted", "Answers whose logits were shifted to the live prior (apply)")
    return _METRICS


def live_prior_from_settings(settings: Any, meta: ModelJson, worker: str,
                             metrics: dict[str, Any] | None = None) -> LivePrior | None:
    """The service's LivePrior from its `ServiceSettings` (None for LTSERVE_PRIOR_ADAPT=off).

    LTSERVE_PRIOR_METHOD=auto (the default) becomes bbse or em for this package here (`resolve_method`); GET /prior,
    GET /model (`LivePrior.model_info`) and the start-up log say which and why.

    Raises:
        ConfigError: LTSERVE_PRIOR_METHOD=bbse on a package without the val confusion matrix (`check_method`).
    """
    if settings.prior_adapt == "off":
        return None
    check_method(settings.prior_method, PackagePrior.from_meta(meta), "LTSERVE_PRIOR_METHOD")
    estimator = EstimatorSettings(method=settings.prior_method, window=settings.prior_window,
                                  half_life=settings.prior_half_life, min_samples=settings.prior_min_samples,
                                  max_shift=settings.prior_max_shift, dead_band=settings.prior_dead_band)
    state_dir = settings.prior_state_dir.expanduser() if settings.prior_state_dir else default_state_dir(meta)
    return LivePrior(meta, estimator, settings.prior_adapt, state_dir, worker, settings.prior_persist_s, metrics)
