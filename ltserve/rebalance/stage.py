"""One `ltserve rebalance` invocation: the run's features, and the heads fitted so far, fitted in base order.

Each head of the registry is fitted by its method on its base head (joint, or tau_norm / lws for their +la
compositions): the base is taken from this invocation when it was fitted here, else read from `heads/` (with its
target prior and temperature removed), else fitted first. Then the target prior is added, a temperature is fitted
on val, val metrics are recorded, and the head is saved.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from ltserve.config import Config
from ltserve.errors import RunError
from ltserve.features.cache import cached_features
from ltserve.heads import HEADS, CalibratedHead, apply_target_prior, save_head, strip_target_prior
from ltserve.heads.calibrate import calibrate
from ltserve.heads.common import HeadFitter
from ltserve.metrics import classification_report
from ltserve.rebalance.prior import target_log_prior
from ltserve.rundir import Run, utc_now

log = logging.getLogger(__name__)


def build_method(name: str, cfg: Config, run: Run, *, device: str = "auto", progress: bool = True) -> HeadFitter:
    """The method object that fits head `name`, its settings taken from the recipe's `rebalance.<section>`."""
    entry = HEADS.get(name)
    if entry.method is None:
        raise RunError(f"head {name!r} is trained by stage 1, not fitted by stage 2")
    rcfg = cfg.rebalance
    return entry.method(rcfg.section(entry.section), seed=rcfg.seed, device=device, progress=progress,
                        many_threshold=run.info.many_threshold, few_threshold=run.info.few_threshold)


class Stage2:
    """The state of one invocation: the run, its features and the raw (pre-prior, pre-temperature) heads fitted."""

    def __init__(self, run: Run, cfg: Config, *, device: str, progress: bool):
        self.run, self.cfg, self.rcfg = run, cfg, cfg.rebalance
        self.device, self.progress = device, progress
        self.joint = run.head("joint")
        self.train_x, self.train_y = cached_features(run, "train", progress=progress)
        self.val_x, self.val_y = cached_features(run, "val", progress=progress)
        self.counts = np.asarray(run.info.class_counts, dtype=np.int64)
        self._check_features()
        # read a prior file before any fitting, so a bad file fails fast
        self.prior = target_log_prior(self.rcfg.target_prior, self.counts, run.info.class_names)
        self.raw: dict[str, CalibratedHead] = {"joint": strip_target_prior(self.joint)}
        self.saved: dict[str, CalibratedHead] = {}
        self._augmented: Any = None

    def _check_features(self) -> None:
        paths, c = self.run.paths, self.joint.num_classes
        if len(self.counts) != c:
            raise RunError(f"{paths.run_json}: {len(self.counts)} class counts but heads/joint has {c} classes")
        if not np.array_equal(np.bincount(self.train_y, minlength=c), self.counts):
            raise RunError(f"{paths.cache}: cached train labels do not match run.json's class_counts; the cache "
                           "is stale: delete the cache/ folder and run again")
        if len(self.val_y) == 0:
            raise RunError(f"{paths.root}: the run has no val split; stage 2 picks epochs and tau on val "
                           "(train with data.val_fraction > 0 or data.longtail.val_per_class > 0)")

    def train_features(self, name: str) -> Any:
        """Cached features, or (without the cache, for heads that train) augmented images through the backbone."""
        if self.rcfg.use_cache or not HEADS.get(name).trains:
            return self.train_x
        if self._augmented is None:
            from ltserve.rebalance.augmented import AugmentedSource

            self._augmented = AugmentedSource.from_run(self.run, self.cfg, device=self.device)
        return self._augmented

    def base(self, name: str) -> CalibratedHead:
        """The raw head `name` builds on: fitted in this invocation, else read from heads/, else fitted now."""
        base = HEADS.get(name).base
        if base in self.raw:
            return self.raw[base]
        if (self.run.paths.heads / f"{base}.safetensors").is_file():
            log.info("%s: building on the saved %s head", name, base)
            self.raw[base] = strip_target_prior(self.run.head(base))
            return self.raw[base]
        log.info("%s: fitting its base head %s first (it is saved too)", name, base)
        self.fit(base)
        return self.raw[base]

    def fit(self, name: str) -> CalibratedHead:
        """Fit head `name`, add the target prior, calibrate, record val metrics, save it; returns the saved head."""
        start = time.perf_counter()
        method = build_method(name, self.cfg, self.run, device=self.device, progress=self.progress)
        raw = method.fit(self.train_features(name), self.train_y, self.base(name), val=(self.val_x, self.val_y))
        if raw.method != name:  # a method shared by several heads (la) may name its result otherwise
            raw = replace(raw, method=name)
        self.raw[name] = raw
        head = self.finish(raw).with_meta(fit_seconds=time.perf_counter() - start, **self.provenance(name))
        save_head(head, self.run.paths.heads)
        self.saved[name] = head
        return head

    def finish(self, raw: CalibratedHead) -> CalibratedHead:
        """Target prior, temperature and val metrics on a raw head."""
        head = apply_target_prior(raw, *self.prior)
        if self.rcfg.calibrate:
            head = calibrate(head, self.val_x, self.val_y)
        return head.with_meta(val=self.val_report(head))

    def val_report(self, head: CalibratedHead) -> dict[str, Any]:
        info = self.run.info
        return classification_report(head.logits(self.val_x), self.val_y, self.counts, info.many_threshold,
                                     info.few_threshold, temperature=head.temperature)

    def provenance(self, name: str) -> dict[str, Any]:
        entry, info = HEADS.get(name), self.run.info
        return {
            "settings": self.rcfg.section(entry.section).model_dump(mode="json"),
            "seed": self.rcfg.seed,
            "calibrate": self.rcfg.calibrate,
            "train_features": "cached" if self.rcfg.use_cache or not entry.trains else "augmented",
            "backbone_sha256": info.backbone.sha256,
            "data_fingerprint": info.data_fingerprint,
            "created": utc_now(),
        }

