"""The one head value every method returns, its folding arithmetic and its target-prior shift (NumPy only).

A `CalibratedHead` is already a linear layer: logits = (transform(x) @ weight.T + bias) / temperature.
Each method writes its re-balancing into `weight` and `bias` (see `../shared/reference/decoupling.md`, "Folding"):

    tau_norm: W'_j = W_j / max(||W_j||, eps)^tau, b' = 0 (or b with keep_bias)
    lws:      W'_j = f_j W_j, b'_j = f_j b_j
    la:       b'_j = b_j - tau_la log pi_j (+ log pi_target_j)
    ncm:      W' = 2 C, b'_j = -||c_j||^2 after x -> (x - mu) / ||x - mu||  (euclidean)
              W' = C_j / ||C_j||, b' = 0 after the same normalisation            (cosine)

and keeps the parameters that produced them (tau, scales, tau_la, prior, ...) in `meta` and `extras`, so tests and
export can recompute the unfolded logits independently (each method's `reference`). `folded()` gives the single
Gemm that export writes.

The target prior: adding log(pi_target_j) to the bias moves a head re-balanced for a uniform test mix to another
class mix. The shift is kept in extras["target_log_prior"] and meta["target_prior"], so the raw re-balanced head can
be recovered (`strip_target_prior`), e.g. to compose tau_norm+la from a saved tau_norm head.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import numpy as np

FeatureTransform = Literal["none", "centred_l2"]
L2_EPS = 1e-12
PRIOR_KEY = "target_log_prior"
"""Extras key of the target-prior shift added to the bias."""


@dataclass(frozen=True)
class CalibratedHead:
    """A linear classifier on pooled features, possibly after a fixed normalisation.

    Attributes:
        weight: (C, D) float32.
        bias: (C,) float32.
        method: head name (joint, crt, tau_norm, lws, ncm, la, tau_norm+la, lws+la, or a registered method).
        feature_transform: "none", or "centred_l2": x -> (x - centre) / max(||x - centre||, 1e-12) (ncm).
        centre: (D,) float32 when feature_transform is centred_l2, else None.
        temperature: calibration temperature T > 0; logits are divided by T (1.0 = none fitted).
        meta: JSON-able parameters and choices (tau, tau_la, target_prior, sweep curves, val metrics, ...).
        extras: named arrays that are parameters rather than the folded layer (e.g. lws "scales" (C,)).
    """

    weight: np.ndarray
    bias: np.ndarray
    method: str
    feature_transform: FeatureTransform = "none"
    centre: np.ndarray | None = None
    temperature: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w, b = np.asarray(self.weight), np.asarray(self.bias)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"head {self.method}: weight must be (C, D) and bias (C,), got {w.shape} and {b.shape}")
        if self.feature_transform == "centred_l2" and (self.centre is None or np.shape(self.centre) != (w.shape[1],)):
            raise ValueError(f"head {self.method}: centred_l2 needs a centre of shape ({w.shape[1]},)")
        if not self.temperature > 0:
            raise ValueError(f"head {self.method}: temperature must be > 0, got {self.temperature}")
        object.__setattr__(self, "weight", w.astype(np.float32))
        object.__setattr__(self, "bias", b.astype(np.float32))
        if self.centre is not None:
            object.__setattr__(self, "centre", np.asarray(self.centre, dtype=np.float32))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[1])

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Apply the fixed feature normalisation. (N, D) -> (N, D) float32."""
        x = np.asarray(features, dtype=np.float32)
        if self.feature_transform == "centred_l2":
            x = x - self.centre
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), L2_EPS)
        return x

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Calibrated logits. features (N, D) -> (N, C) float32."""
        weight, bias = self.folded()
        return self.transform(features) @ weight.T + bias

    def uncalibrated_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits before the temperature (T = 1). features (N, D) -> (N, C) float32."""
        return self.transform(features) @ self.weight.T + self.bias

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The single Gemm export writes: (W / T, b / T), shapes (C, D) and (C,), float32."""
        t = np.float32(self.temperature)
        return self.weight / t, self.bias / t

    def with_temperature(self, temperature: float, **meta: Any) -> "CalibratedHead":
        """The same head with a calibration temperature (argmax unchanged)."""
        return replace(self, temperature=float(temperature), meta={**self.meta, **meta})

    def with_meta(self, **meta: Any) -> "CalibratedHead":
        """The same head with `meta` entries added or replaced."""
        return replace(self, meta={**self.meta, **meta})


def apply_target_prior(head: CalibratedHead, log_prior: np.ndarray | None, info: dict[str, Any]) -> CalibratedHead:
    """The head with log pi_target added to its bias (recorded in meta and extras); unchanged bias for None."""
    meta = {**head.meta, "target_prior": info}
    if log_prior is None:
        return replace(head, meta=meta)
    bias = head.bias.astype(np.float64) + log_prior
    return replace(head, bias=bias, meta=meta, extras={**head.extras, PRIOR_KEY: log_prior.astype(np.float32)})


def strip_target_prior(head: CalibratedHead) -> CalibratedHead:
    """The raw re-balanced head: target-prior shift removed, temperature reset to 1."""
    extras = dict(head.extras)
    extras.pop(PRIOR_KEY, None)
    meta = {k: v for k, v in head.meta.items() if k not in ("target_prior", "calibration")}
    return replace(head, bias=raw_bias(head), temperature=1.0, meta=meta, extras=extras)


def raw_bias(head: CalibratedHead) -> np.ndarray:
    """The bias without the target-prior shift, float64 (C,)."""
    shift = head.extras.get(PRIOR_KEY)
    return head.bias.astype(np.float64) - (0.0 if shift is None else shift.astype(np.float64))


def served_prior(weights: Sequence[float] | None, temperature: float, num_classes: int) -> np.ndarray:
    """The class mix a head's served probabilities are calibrated for, (C,) float64 summing to 1.

    The target-prior shift is added to the bias before the temperature divides it, so the served logits carry
    log(pi_target) / T: the mix is pi_target^(1/T), normalised (uniform for None: no target weights recorded). A zero
    weight is floored at float32's tiny, as `ltserve.rebalance.prior` folds it.
    """
    if weights is None:
        return np.full(num_classes, 1.0 / num_classes)
    pi = np.asarray(weights, dtype=np.float64)
    if pi.shape != (num_classes,) or not np.isfinite(pi).all() or (pi < 0).any() or pi.sum() <= 0:
        raise ValueError(f"target prior weights must be {num_classes} finite values >= 0, not all 0")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_pi = np.log(np.maximum(pi / pi.sum(), np.finfo(np.float32).tiny)) / float(temperature)
    p = np.exp(log_pi - log_pi.max())
    return p / p.sum()
