"""`ltserve predict --adapt-prior`: estimate the class prior of the whole input from its own logits (transductive),
then write every row adapted to it.

The logits of every predicted file are kept in a memory-mapped file beside the output (N x C float32: a million
images of 10 classes is 40 MB on disk, not in memory) until the input is done; then the prior is estimated over all
of them (`ltserve.runtime.prior.estimate_prior`: EM over the posteriors, or BBSE with the package's val confusion
matrix; auto, the default, picks BBSE when the package records a usable matrix), the log ratio log(pi_input / pi_src) is added to every row by the service's rule (`prior_shift`: dead band,
centred, capped; nothing below the sample floor), and the rows are written in input order.
With labels in a list file the summary gives the accuracy with and without the adaptation.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.batch.inputs import Item
from ltserve.batch.output import Output, prediction_row
from ltserve.metrics import round_distribution
from ltserve.package import ModelJson
from ltserve.runtime import Predictor
from ltserve.runtime.prior import (AUTO, DEFAULT_DEAD_BAND, DEFAULT_MAX_SHIFT, DEFAULT_MIN_SAMPLES, PackagePrior,
                                   estimate_prior, prior_shift, resolve_method, tv_distance)

logger = logging.getLogger(__name__)


class TransductiveAdapter:
    """Holds a job's logits until the input is done, then estimates the prior and writes the adapted rows.

    Args:
        meta: the package's model.json.
        capacity: most rows (the number of input files).
        out: the job's output path (the memory map lives in a temporary folder beside it, removed at the end).
        method: "auto" (bbse when the package records a usable val confusion matrix, else em; resolved here, once:
            `resolve_method`), "em" or "bbse" (refused here, before any file is predicted, on a package without
            the matrix).
        min_samples: fewer predicted files leave the rows unadapted (the estimate would be noise).
        max_shift: cap on |log(pi_input / pi_src)| per class, nats.
    """

    def __init__(self, meta: ModelJson, capacity: int, out: Path, method: str = AUTO,
                 min_samples: int = DEFAULT_MIN_SAMPLES, max_shift: float = DEFAULT_MAX_SHIFT) -> None:
        self.meta, self.min_samples, self.max_shift = meta, int(min_samples), float(max_shift)
        self.package = PackagePrior.from_meta(meta)
        self.method_setting = method
        self.method, self.method_reason = resolve_method(method, self.package, "--adapt-prior")
        self._tmp = tempfile.TemporaryDirectory(prefix=".ltserve-adapt-", dir=Path(out).resolve().parent)
        self._logits = np.lib.format.open_memmap(Path(self._tmp.name) / "logits.npy", mode="w+", dtype=np.float32,
                                                 shape=(max(1, capacity), len(meta.labels)))
        self.items: list[Item] = []

    def keep(self, items: Sequence[Item], logits: np.ndarray) -> None:
        """Store a batch's logits (N, C) for its items."""
        k = len(self.items)
        self._logits[k:k + len(items)] = logits
        self.items.extend(items)

    def finish(self, predictor: Predictor, top_k: int, batch_size: int, output: Output) -> dict[str, Any]:
        """Estimate, adapt, write every row (input order); return the summary's `prior` entry."""
        try:
            n = len(self.items)
            logits = self._logits[:n]
            est = estimate_prior(logits, self.package, self.method, min_samples=self.min_samples)
            shift = prior_shift(est.prior, self.package.source, self.max_shift) if est.estimated else None
            why = ("" if shift is not None else f"{n} predicted files, fewer than the {self.min_samples} needed"
                   if not est.estimated else "the estimate is within the dead band of the package's prior")
            labels = predictor.labels
            for s in range(0, n, batch_size):
                chunk = np.asarray(logits[s:s + batch_size])
                adapted = chunk if shift is None else chunk + shift
                preds = predictor.postprocess(adapted, top_k)
                rows = [prediction_row(it, p.model_dump(mode="json"), labels)
                        for it, p in zip(self.items[s:s + batch_size], preds)]
                output.rows(rows, unadapted=chunk.argmax(axis=1).tolist())
                output.flush(0)
            info = {"method": est.method, "method_setting": self.method_setting, "method_reason": self.method_reason,
                    "adapted": shift is not None, "n": est.n,
                    "estimate": dict(zip(labels, round_distribution(est.prior))),
                    "target": dict(zip(labels, round_distribution(self.package.target))),
                    "target_kind": self.package.kind,
                    "tv_from_target": round(tv_distance(est.prior, self.package.target), 6),
                    "expected_tv_error": None if est.expected_tv_error is None else round(est.expected_tv_error, 6),
                    "shift": None if shift is None else dict(zip(labels, (round(float(v), 4) for v in shift))),
                    "max_shift": self.max_shift, "min_samples": self.min_samples, "dead_band": DEFAULT_DEAD_BAND,
                    **{k: v for k, v in est.extra.items() if k != "reason"},
                    **({"not_adapted": why} if why else {})}
            if why:
                logger.warning("--adapt-prior: rows not adapted: %s", why)
            return info
        finally:
            self.close()

    def close(self) -> None:
        """Drop the memory map and its folder."""
        mm = getattr(self._logits, "_mmap", None)
        if mm is not None:
            mm.close()
        self._tmp.cleanup()
