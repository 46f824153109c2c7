"""Label shift: estimate the class mix of the traffic from the model's own outputs, and adapt the logits to it.

A package's head is tuned for one class prior, the target prior chosen at export (`model.json`
head.params.target_prior). When the live mix pi_live differs, Bayes' rule moves a calibrated posterior to it by a
bias shift alone:

    p_live(y | x)  ∝  p_src(y | x) * pi_live(y) / pi_src(y)      i.e.  logits + log(pi_live / pi_src)

pi_src is the mix the served probabilities are calibrated for. The head's target-prior shift is folded into the
bias *before* the temperature divides it ((z + log pi_target) / T), so the served logits carry log(pi_target) / T:
pi_src = pi_target^(1/T), normalised (the target prior itself when it is uniform or T = 1), times exp(-bias) when
export measured a class-wise bias on val (model.json `label_shift.bias`: a head that over-predicts a class makes EM
over-estimate its share; `ltserve.heads.calibrate.fit_class_bias`).

Two estimators of pi_live, both from unlabelled outputs, and a rule that picks one:

    em     Saerens, Latinne & Decaestecker (2002): alternate "posteriors under the current prior" and "prior = mean
           posterior" until it stops moving; the maximum-likelihood prior of the observed images. Needs calibrated
           probabilities (ltserve's heads are calibrated on val).
    bbse   Black-box shift estimation, Lipton, Wang & Smola (2018): with M[i, j] = P(predicted i | true j) from the
           val confusion matrix (export records it in model.json `label_shift`), the mix of predicted classes on
           the traffic is mu = M pi_live; solve for pi_live (least squares), clip at 0, renormalise. Needs no
           calibration, but only 20 val images per class on the default recipe, so M itself is noisy.
    auto   (the default) bbse when the package records a usable val confusion matrix (`bbse_usable`: every class
           has >= BBSE_MIN_VAL_PER_CLASS val images and M's condition number is <= BBSE_MAX_CONDITION), else em;
           resolved once per package (`resolve_method`), with the reason. EM is only as good as the head's
           calibration under the prior it is read against, and a logit-adjusted or re-scaled head (la with tau != 1,
           lws) may not give it: on the default package (lws+la) EM's estimate was 0.21 TV off on a uniform stream
           where BBSE's was not (docs/label-shift.md). Older packages have no matrix: em.

Both take per-image weights (a decayed window), add `pseudo_count` images per class spread as the package's
prior (smoothing: no class is ever estimated at exactly 0, and a few images barely move the estimate), return the
package's target prior below `min_samples` images, and report a confidence: per-class standard errors and the
expected total-variation error they imply (observed Fisher information for em, the delta method for bbse).

Adapting (`prior_shift`) adds log(pi_live / pi_src) after a dead band (an estimate within 0.05 total variation of
pi_src adapts nothing), centred, capped at `max_shift` nats. `PriorWindow` keeps the last `window` images' logits
with their wall-clock times (mergeable across worker processes), `LiveEstimator` re-estimates every `every` images
from it (warm-started) and holds the shift to add to the logits. NumPy only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ltserve.errors import ConfigError, unknown_choice
from ltserve.heads.head import served_prior
from ltserve.package import LabelShiftInfo, ModelJson

METHODS = ("em", "bbse")
"""The estimators. A setting may also say AUTO, which `resolve_method` turns into one of them per package."""
AUTO = "auto"
METHOD_CHOICES = (AUTO, *METHODS)
BBSE_MIN_VAL_PER_CLASS = 10
"""auto: fewest val images of any class for bbse. Each column of M is a class's predicted mix on its own val images;
with fewer than 10, one image moves an entry by more than 0.1 (the committed package has 20 per class)."""
BBSE_MAX_CONDITION = 10.0
"""auto: largest condition number of M for bbse. Inverting M multiplies the noise of the traffic's predicted mix and
of M itself by up to this factor (the columns of M sum to 1, so its largest singular value is about 1); the committed
package's M has 2.05, a head that confuses two classes half the time has > 10."""
DEFAULT_MIN_SAMPLES = 200
DEFAULT_PSEUDO_COUNT = 1.0
DEFAULT_MAX_SHIFT = 3.0
"""nats: the largest |log(pi_live / pi_src)| added to any logit (a factor of 20 either way)."""
DEFAULT_DEAD_BAND = 0.05
"""total variation: an estimate this close to the package's prior adapts nothing (see `prior_shift`)."""
DEFAULT_WINDOW = 2000
DEFAULT_EVERY = 200
_CHUNK = 65536  # rows per step: EM over a memory-mapped batch job never holds more than this many posteriors


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance 0.5 * sum |p - q| of two priors (C,), in [0, 1]."""
    return float(0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64. (N, C) -> (N, C)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _posteriors(rows: np.ndarray, probabilities: bool) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64) if probabilities else softmax64(rows)


def _normalise(p: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ConfigError(f"{what}: a prior must be C finite weights >= 0, not all 0; got {p!r}")
    return p / p.sum()


# ---------------------------------------------------------------------------------------------------------------------
# What the package assumes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagePrior:
    """The priors of a model package and what the estimators need from model.json.

    Attributes:
        target: (C,) the target prior the head was exported for (head.params.target_prior; uniform if absent).
        source: (C,) the mix the served probabilities are calibrated for: target^(1/T) * exp(-bias), normalised
            (bias: the head's class-wise bias measured on val at export, `label_shift.bias`; none in older
            packages). EM reads the probabilities against it, and adapting adds log(pi_live / source).
        kind: "uniform", "train" or "file".
        confusion: (C, C) val confusion counts (rows true class, columns predicted class) or None (older package).
    """

    target: np.ndarray
    source: np.ndarray
    kind: str = "uniform"
    confusion: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return int(self.target.shape[0])

    @classmethod
    def uniform(cls, num_classes: int, confusion: np.ndarray | None = None) -> "PackagePrior":
        u = np.full(num_classes, 1.0 / num_classes)
        return cls(u, u.copy(), "uniform", None if confusion is None else np.asarray(confusion, dtype=np.float64))

    @classmethod
    def from_meta(cls, meta: ModelJson) -> "PackagePrior":
        """The priors of a package's model.json (older packages: the head's calibration trusted, no confusion)."""
        return cls.from_parts(meta.head.params.get("target_prior"), meta.head.temperature, meta.label_shift,
                              len(meta.labels))

    @classmethod
    def from_parts(cls, target_prior: dict[str, Any] | None, temperature: float,
                   label_shift: LabelShiftInfo | None, num_classes: int) -> "PackagePrior":
        """From what model.json records: head.params.target_prior ({"kind", "weights"}), head.temperature and
        label_shift (the same values export computes for a run's head, so a benchmark can skip the ONNX file)."""
        c = int(num_classes)
        info = target_prior or {"kind": "uniform"}
        kind = str(info.get("kind", "uniform"))
        weights = info.get("weights") if kind != "uniform" else None
        if weights is not None and len(weights) != c:
            raise ConfigError(f"model.json head.params.target_prior.weights has {len(weights)} values for {c} "
                              "classes; re-export the package")
        target = (np.full(c, 1.0 / c) if weights is None
                  else _normalise(np.asarray(weights, dtype=np.float64), "target prior"))
        source = served_prior(weights, temperature, c)
        confusion = None
        if label_shift is not None:
            confusion = np.asarray(label_shift.confusion, dtype=np.float64)
            if label_shift.bias is not None:
                source = source * np.exp(-np.asarray(label_shift.bias, dtype=np.float64))
                source /= source.sum()
        return cls(target, source, kind, confusion)


# ---------------------------------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorEstimate:
    """An estimate of the live class prior.

    Attributes:
        prior: (C,) the estimate (sums to 1); the package's target prior when method is "target".
        method: "em", "bbse", or "target" (fewer than min_samples images: nothing estimated).
        n: images it was computed from.
        n_effective: (sum w)^2 / sum w^2 of the image weights (n without decay).
        iterations: EM iterations (0 for bbse and target).
        converged: EM met its tolerance (True for bbse and target).
        std: (C,) standard error of each class's share, or None (not computed, or target). It measures the
            sampling noise of the images seen, not a miscalibration of the head (which biases EM whatever the count).
        expected_tv_error: sum_j sqrt(2 / pi) * std_j / 2: the total-variation error to expect from that noise.
    """

    prior: np.ndarray
    method: str
    n: int
    n_effective: float
    iterations: int = 0
    converged: bool = True
    std: np.ndarray | None = None
    expected_tv_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def estimated(self) -> bool:
        return self.method != "target"

    def to_dict(self, labels: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able: prior (a list, or {label: share} with labels), method, n, n_effective, confidence."""
        prior = [float(p) for p in self.prior]
        out: dict[str, Any] = {"method": self.method, "n": int(self.n),
                               "n_effective": round(float(self.n_effective), 2), "prior": dict(zip(labels, prior)) if labels is not None else prior,
                               "iterations": int(self.iterations), "converged": bool(self.converged)}
        if self.std is not None:
            std = [float(s) for s in self.std]
            out["std"] = dict(zip(labels, std)) if labels is not None else std
        out["expected_tv_error"] = None if self.expected_tv_error is None else float(self.expected_tv_error)
        return {**out, **self.extra}


def _weights(n: int, weights: np.ndarray | None) -> tuple[np.ndarray, float, float]:
    """(w (n,), sum w, n_effective)."""
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be (N,) = ({n},) finite and >= 0, got shape {w.shape}")
    total = float(w.sum())
    n_eff = total * total / float(np.dot(w, w)) if total > 0 else 0.0
    return w, total, n_eff


def em_prior(logits: np.ndarray, source: np.ndarray, weights: np.ndarray | None = None, *,
             pseudo_count: float = DEFAULT_PSEUDO_COUNT, init: np.ndarray | None = None, tol: float = 1e-5,
             max_iter: int = 1000, probabilities: bool = False) -> tuple[np.ndarray, int, bool]:
    """Saerens EM: the prior that maximises the likelihood of the images (MAP with a Dirichlet smoothing).

    With a_ij = p_src(j | x_i) / pi_src(j) (proportional to p(x_i | j)), one step is

        r_ij = a_ij pi_j / sum_k a_ik pi_k          (posteriors under the current prior)
        pi_j = (sum_i w_i r_ij + alpha_j) / (sum_i w_i + sum_k alpha_k),   alpha = pseudo_count * C * source

    computed as pi_j * ((w / (a pi)) @ a)_j: two matrix-vector products per step, no (N, C) temporary. The loop
    stops when no share moves by more than `tol`.

    Args:
        logits: (N, C) the package's logits (softmax gives p_src); may be a memory map (read in row chunks).
        source: (C,) pi_src, the mix those probabilities are calibrated for (`PackagePrior.source`).
        weights: (N,) image weights (decay), or None for 1 each.
        pseudo_count: smoothing, in images per class (0: plain maximum likelihood).
        init: (C,) starting prior (warm start from the last estimate), default `source`.
        tol: largest change of a share that counts as converged (1e-5: far below the estimate's own error).
        probabilities: `logits` holds softmax probabilities already (the live window caches them).

    Returns:
        (prior (C,) float64, iterations, converged).
    """
    src = _normalise(source, "source prior")
    n, c = logits.shape
    w, total, _ = _weights(n, weights)
    alpha = float(pseudo_count) * c * src
    pi = src.copy() if init is None else _normalise(init, "init")
    pi = np.maximum(pi, 1e-12)  # a share of exactly 0 could never come back
    chunks = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    cached = None
    if len(chunks) == 1:  # the live window: compute the likelihood ratios once
        cached = _posteriors(logits, probabilities) / src
    for it in range(1, max_iter + 1):
        acc = np.zeros(c)
        for s, e in chunks:
            a = cached if cached is not None else _posteriors(logits[s:e], probabilities) / src
            acc += (w[s:e] / (a @ pi)) @ a
        new = (pi * acc + alpha) / (total + alpha.sum())
        if float(np.abs(new - pi).max()) < tol:
            return new, it, True
        pi = new
    return pi, max_iter, False


def em_confidence(logits: np.ndarray, source: np.ndarray, prior: np.ndarray,
                  weights: np.ndarray | None = None, probabilities: bool = False) -> tuple[np.ndarray, float]:
    """Standard errors of an EM estimate from the observed Fisher information of the mixture likelihood.

    With s_i = a_i / (a_i . pi) (the score of image i), I = sum_i w_i s_i s_i^T (weights scaled to sum to
    n_effective), and on the simplex Cov = I^+ - pi pi^T / n_effective (I pi = n 1 at the maximum).

    Returns:
        (std (C,), expected total-variation error = sum_j sqrt(2 / pi) std_j / 2).
    """
    src = _normalise(source, "source prior")
    n, c = logits.shape
    w, total, n_eff = _weights(n, weights)
    if n_eff <= 0:
        return np.full(c, np.nan), float("nan")
    w = w * (n_eff / total)
    info = np.zeros((c, c))
    for s in range(0, n, _CHUNK):
        a = _posteriors(logits[s:s + _CHUNK], probabilities) / src
        sc = a / (a @ prior)[:, None]
        info += (sc * w[s:s + _CHUNK, None]).T @ sc
    cov = np.linalg.pinv(info, hermitian=True) - np.outer(prior, prior) / n_eff
    std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return std, float(0.5 * math.sqrt(2.0 / math.pi) * std.sum())


def confusion_given_true(confusion: np.ndarray) -> np.ndarray:
    """M[i, j] = P(predicted i | true j) from val confusion counts (rows true, columns predicted).

    Raises:
        ConfigError: a class has no val image (its column of M is unknown).
    """
    k = np.asarray(confusion, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ConfigError(f"label_shift.confusion must be (C, C), got {k.shape}")
    rows = k.sum(axis=1)
    if (rows <= 0).any():
        missing = np.flatnonzero(rows <= 0).tolist()
        raise ConfigError(f"label_shift.confusion: classes {missing} have no val image, so bbse cannot use it; "
                          "use the em method")
    return (k / rows[:, None]).T


def bbse_prior(logits: np.ndarray, confusion: np.ndarray, anchor: np.ndarray, weights: np.ndarray | None = None, *,
               pseudo_count: float = DEFAULT_PSEUDO_COUNT) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Black-box shift estimation: solve M pi = mu for the mix of predicted classes mu on the traffic.

    Args:
        logits: (N, C) the package's logits (only their argmax is used); may be a memory map.
        confusion: (C, C) val confusion counts, rows true class, columns predicted (model.json label_shift).
        anchor: (C,) the prior the smoothing pseudo-counts are spread as.
        weights: (N,) image weights, or None.
        pseudo_count: smoothing, images per class.

    Returns:
        (prior (C,), std (C,) from the delta method on mu (the val split's own noise is not counted),
        expected total-variation error, condition number of M).
    """
    m = confusion_given_true(confusion)
    n, c = logits.shape
    w, total, n_eff = _weights(n, weights)
    mu = np.zeros(c)
    for s in range(0, n, _CHUNK):
        mu += np.bincount(np.asarray(logits[s:s + _CHUNK]).argmax(axis=1), weights=w[s:s + _CHUNK], minlength=c)
    mu /= max(total, 1e-300)
    m_inv = np.linalg.pinv(m)
    raw = np.clip(m_inv @ mu, 0.0, None)
    raw = raw / raw.sum() if raw.sum() > 0 else _normalise(anchor, "anchor")
    alpha = float(pseudo_count) * c * _normalise(anchor, "anchor")
    pi = (n_eff * raw + alpha) / (n_eff + alpha.sum())
    cov_mu = (np.diag(mu) - np.outer(mu, mu)) / max(n_eff, 1e-300)
    std = np.sqrt(np.clip(np.diag(m_inv @ cov_mu @ m_inv.T), 0.0, None))
    return pi, std, float(0.5 * math.sqrt(2.0 / math.pi) * std.sum()), float(np.linalg.cond(m))


def estimate_prior(logits: np.ndarray, package: PackagePrior, method: str = "em", weights: np.ndarray | None = None,
                   *, min_samples: int = DEFAULT_MIN_SAMPLES, pseudo_count: float = DEFAULT_PSEUDO_COUNT,
                   init: np.ndarray | None = None, confidence: bool = True,
                   probabilities: bool = False) -> PriorEstimate:
    """Estimate the prior of the images behind `logits`.

    Args:
        logits: (N, C) the package's (unadapted) logits; may be a memory map.
        package: the package's priors (and confusion matrix, for bbse).
        method: "em", "bbse" (needs `package.confusion`) or "auto" (`resolve_method`; callers that estimate
            repeatedly resolve once and pass the result).
        weights: (N,) image weights (decay), or None.
        min_samples: fewer images than this (N, not n_effective) give the target prior, method "target".
        pseudo_count: smoothing, images per class.
        init: em's warm start.
        confidence: compute std and expected_tv_error (a C x C pseudo-inverse: skip it on hot paths).
        probabilities: `logits` holds softmax probabilities already (argmax and EM are the same).

    Raises:
        ConfigError: unknown method, or bbse on a package without a confusion matrix.
    """
    if method not in METHOD_CHOICES:
        raise ConfigError(unknown_choice("prior method", method, METHOD_CHOICES))
    if method == AUTO:
        method = resolve_method(method, package)[0]
    if method == "bbse" and package.confusion is None:
        raise ConfigError("prior method bbse needs the val confusion matrix in model.json (label_shift), which this "
                          "package lacks; re-export it with this ltserve, or use method em")
    logits = logits if isinstance(logits, np.memmap) else np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != package.num_classes:
        raise ValueError(f"logits must be (N, {package.num_classes}), got {logits.shape}")
    n = int(logits.shape[0])
    _, _, n_eff = _weights(n, weights)
    if n < max(1, int(min_samples)):
        return PriorEstimate(package.target.copy(), "target", n, n_eff,
                             extra={"reason": f"{n} images, fewer than the {int(min_samples)} needed"})
    if method == "em":
        pi, iters, ok = em_prior(logits, package.source, weights, pseudo_count=pseudo_count, init=init,
                                 probabilities=probabilities)
        std, tv = (em_confidence(logits, package.source, pi, weights, probabilities) if confidence
                   else (None, None))
        return PriorEstimate(pi, "em", n, n_eff, iters, ok, std, tv)
    pi, std, tv, cond = bbse_prior(logits, package.confusion, package.target, weights,  # type: ignore[arg-type]
                                   pseudo_count=pseudo_count)
    return PriorEstimate(pi, "bbse", n, n_eff, 0, True, std if confidence else None, tv if confidence else None,
                         extra={"condition_number": cond})


# ---------------------------------------------------------------------------------------------------------------------
# Adapting
# ---------------------------------------------------------------------------------------------------------------------


def prior_shift(estimate: np.ndarray, source: np.ndarray, max_shift: float = DEFAULT_MAX_SHIFT,
                dead_band: float = DEFAULT_DEAD_BAND) -> np.ndarray | None:
    """What adapting adds to every logit row: log(pi_live / pi_src) after a dead band, centred and capped.

    1. Dead band: the estimate is moved `dead_band` (total variation) towards pi_src, and an estimate closer than
       that gives no shift at all (None). EM's estimate is off by ~0.05 on the default model's own balanced traffic
       (its class-wise miscalibration), so without it adapting would chase that error and cost accuracy where
       nothing shifted; the move is continuous in the estimate, so no threshold flips adaptation on and off.
    2. The log ratio, less its median (a constant changes no probability; the cap then bites on what matters).
    3. Capped at +-max_shift nats per class.

    Returns:
        (C,) float32, or None when the estimate is within the dead band.
    """
    est = np.asarray(estimate, dtype=np.float64)
    src = np.asarray(source, dtype=np.float64)
    tv = tv_distance(est, src)
    if tv <= dead_band:
        return None
    moved = src + (1.0 - dead_band / tv) * (est - src)
    d = np.log(np.maximum(moved, 1e-300)) - np.log(np.maximum(src, 1e-300))
    d -= np.median(d)
    return np.clip(d, -float(max_shift), float(max_shift)).astype(np.float32)


def adapt_logits(logits: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """logits (N, C) + shift (C,) (no-op for None): the logits for the live prior."""
    return logits if shift is None else np.asarray(logits, dtype=np.float32) + shift


# ---------------------------------------------------------------------------------------------------------------------
# The live window
# ---------------------------------------------------------------------------------------------------------------------


def decay_weights(n: int, half_life: float) -> np.ndarray | None:
    """Weights of n images ordered oldest first: 0.5 ** (age / half_life), age 0 for the newest; None when off."""
    if not half_life or half_life <= 0:
        return None
    age = np.arange(n - 1, -1, -1, dtype=np.float64)
    return np.power(0.5, age / float(half_life))


class PriorWindow:
    """The last `capacity` images' logits (float32, C each) with their wall-clock times, oldest first on read.

    A ring buffer: `observe` copies a batch in (a couple of microseconds, no allocation), `samples` returns the
    window in time order. Softmax probabilities are cached per row and computed only for the rows added since the
    last `samples(probabilities=True)`, so a re-estimate every 200 images costs the softmax of 200 rows, not of the
    window. Windows of several processes merge by time (`merge_samples`), which keeps a server-wide window the
    last `capacity` images whichever worker served them.
    """

    def __init__(self, num_classes: int, capacity: int = DEFAULT_WINDOW) -> None:
        if capacity < 1:
            raise ConfigError(f"prior window must be >= 1 image, got {capacity}")
        self.capacity, self.num_classes = int(capacity), int(num_classes)
        self._logits = np.zeros((self.capacity, self.num_classes), dtype=np.float32)
        self._probs = np.zeros((self.capacity, self.num_classes), dtype=np.float64)
        self._times = np.zeros(self.capacity, dtype=np.float64)
        self._next = 0  # where the next row goes
        self._stale = 0  # rows before _next (circularly) whose probabilities are not computed yet
        self.size = 0
        self.total = 0  # images observed since the last clear (the window holds the last `capacity`)

    def observe(self, logits: np.ndarray, t: float | None = None) -> None:
        """Add a batch of logits (N, C) seen at wall-clock time t (default now)."""
        n = len(logits)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (N, {self.num_classes}), got {logits.shape}")
        if n > self.capacity:
            logits, n = logits[-self.capacity:], self.capacity
        now = time.time() if t is None else t
        end = self._next + n
        if end <= self.capacity:
            self._logits[self._next:end] = logits
            self._times[self._next:end] = now
        else:
            k = self.capacity - self._next
            self._logits[self._next:], self._logits[:n - k] = logits[:k], logits[k:]
            self._times[self._next:], self._times[:n - k] = now, now
        self._next = end % self.capacity
        self._stale = min(self.capacity, self._stale + n)
        self.size = min(self.capacity, self.size + n)
        self.total += n

    def _order(self) -> np.ndarray | slice:
        if self.size < self.capacity:
            return slice(0, self.size)
        return np.r_[self._next:self.capacity, 0:self._next]

    def samples(self, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(logits (n, C) float32, or their softmax probabilities float64, times (n,) float64), oldest first
        (copies)."""
        order = self._order()
        if not probabilities:
            return self._logits[order].copy(), self._times[order].copy()
        if self._stale:
            rows = np.arange(self._next - self._stale, self._next) % self.capacity
            self._probs[rows] = softmax64(self._logits[rows])
            self._stale = 0
        return self._probs[order].copy(), self._times[order].copy()

    def load(self, logits: np.ndarray, times: np.ndarray, total: int | None = None) -> None:
        """Replace the contents with samples (logits, any order), keeping the newest `capacity`."""
        logits = np.asarray(logits, dtype=np.float32).reshape(-1, self.num_classes)
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        if len(logits) != len(times):
            raise ValueError(f"{len(logits)} logit rows but {len(times)} times")
        self.clear()
        order = np.argsort(times, kind="stable")[-self.capacity:]
        self.observe(logits[order], 0.0)
        self._times[:len(order)] = times[order]
        self.total = max(len(order), int(total or 0))

    def drop_before(self, t: float) -> None:
        """Forget every image seen before wall-clock time t (a reset)."""
        logits, times = self.samples()
        keep = times >= t
        if not keep.all():
            self.load(logits[keep], times[keep], int(keep.sum()))

    def clear(self) -> None:
        self._next, self._stale, self.size, self.total = 0, 0, 0, 0


def merge_samples(parts: Sequence[tuple[np.ndarray, np.ndarray]], capacity: int,
                  since: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The newest `capacity` samples of several windows, oldest first, ignoring those before `since`.

    Args:
        parts: (rows (n_k, C): logits or probabilities, times (n_k,)) per window.

    Returns:
        (rows (n, C), times (n,)); (0, 0) rows when every part is empty.
    """
    parts = [(np.asarray(lg), np.asarray(t, dtype=np.float64)) for lg, t in parts if len(t)]
    if not parts:
        return np.zeros((0, 0)), np.zeros(0)
    logits = np.concatenate([lg for lg, _ in parts])
    times = np.concatenate([t for _, t in parts])
    keep = np.flatnonzero(times >= since)
    order = keep[np.argsort(times[keep], kind="stable")][-int(capacity):]
    return logits[order], times[order]


@dataclass(frozen=True)
class EstimatorSettings:
    """How a live estimate is made and used.

    Attributes:
        method: "auto" (bbse when the package's val confusion matrix is usable, else em: `resolve_method`), "em"
            or "bbse".
        window: images kept (the newest); the estimate forgets older ones entirely.
        half_life: images; > 0 weighs an image 0.5 ** (age / half_life) inside the window (0: equal weights).
        min_samples: fewer images in the window give the target prior and no adaptation (the floor).
        pseudo_count: smoothing, images per class spread as the package's prior.
        max_shift: cap on |log(pi_live / pi_src)| per class, nats.
        dead_band: total variation from the package's prior that adapts nothing (see `prior_shift`).
        every: re-estimate after this many new images (warm-started EM: cheap, but not per request).
    """

    method: str = AUTO
    window: int = DEFAULT_WINDOW
    half_life: float = 0.0
    min_samples: int = DEFAULT_MIN_SAMPLES
    pseudo_count: float = DEFAULT_PSEUDO_COUNT
    max_shift: float = DEFAULT_MAX_SHIFT
    dead_band: float = DEFAULT_DEAD_BAND
    every: int = DEFAULT_EVERY

    def __post_init__(self) -> None:
        if self.method not in METHOD_CHOICES:
            raise ConfigError(unknown_choice("prior method", self.method, METHOD_CHOICES))
        for name in ("window", "min_samples", "every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prior {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dead_band < 1:
            raise ConfigError(f"prior dead_band must be in [0, 1) (a total variation), got {self.dead_band}")
        for name in ("half_life", "pseudo_count", "max_shift"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"prior {name} must be >= 0, got {getattr(self, name)}")


def check_method(method: str, package: PackagePrior, setting: str = "prior method") -> None:
    """What an estimation method needs from the package: bbse needs the val confusion matrix (auto needs nothing:
    it falls back to em).

    Args:
        setting: how the caller's user names the choice, for the message (e.g. "LTSERVE_PRIOR_METHOD").

    Raises:
        ConfigError: an unknown method, or bbse on a package without the confusion matrix (with the fix).
    """
    if method not in METHOD_CHOICES:
        raise ConfigError(unknown_choice(setting, method, METHOD_CHOICES))
    if method == "bbse" and package.confusion is None:
        raise ConfigError(f"{setting}=bbse needs the val confusion matrix in model.json (label_shift), which this "
                          f"package lacks: re-export it with this ltserve, or set {setting}=em")


def bbse_usable(package: PackagePrior) -> tuple[bool, str]:
    """Whether the package's val confusion matrix is good enough for auto to pick bbse, and why (one sentence).

    Usable: recorded (model.json `label_shift`), at least BBSE_MIN_VAL_PER_CLASS val images of every class, and
    M = P(predicted | true) with condition number <= BBSE_MAX_CONDITION (finite: every class is predicted on val).
    An explicit bbse runs on any recorded matrix; these bounds only decide auto's choice.
    """
    if package.confusion is None:
        return False, "model.json records no val confusion matrix (label_shift; exported before it was recorded)"
    k = np.asarray(package.confusion, dtype=np.float64)
    per_class = k.sum(axis=1)
    fewest = int(per_class.min())
    if fewest < BBSE_MIN_VAL_PER_CLASS:
        few = np.flatnonzero(per_class < BBSE_MIN_VAL_PER_CLASS).tolist()
        return False, (f"the val confusion matrix has {fewest} images of its smallest class (classes {few} have "
                       f"fewer than the {BBSE_MIN_VAL_PER_CLASS} bbse needs)")
    cond = float(np.linalg.cond(confusion_given_true(k)))
    if not math.isfinite(cond) or cond > BBSE_MAX_CONDITION:
        return False, (f"the val confusion matrix's condition number is {cond:.3g}, above {BBSE_MAX_CONDITION:g} "
                       "(its inverse would amplify the traffic's sampling noise that much)")
    return True, (f"model.json records a val confusion matrix of {int(k.sum())} images (at least {fewest} per "
                  f"class, >= {BBSE_MIN_VAL_PER_CLASS} needed), condition number {cond:.3g} "
                  f"(<= {BBSE_MAX_CONDITION:g})")


def resolve_method(method: str, package: PackagePrior, setting: str = "prior method") -> tuple[str, str]:
    """The estimator a setting means for this package, and why.

    auto: bbse when `bbse_usable`, else em (a head's calibration is all EM has; BBSE needs only the matrix). em and
    bbse: themselves, after `check_method` (bbse without a matrix is refused, as before auto existed).

    Returns:
        (method "em" or "bbse", reason: one sentence for GET /prior, GET /model and the log).

    Raises:
        ConfigError: as `check_method`.
    """
    check_method(method, package, setting)
    if method != AUTO:
        return method, f"{setting}={method} (set explicitly)"
    usable, why = bbse_usable(package)
    return ("bbse" if usable else "em"), f"{setting}=auto: {'bbse' if usable else 'em'}, because {why}"


class LiveEstimator:
    """The live prior of a stream of predictions: a window, an estimate refreshed every `every` images, a shift.

    `observe(logits)` records a batch's unadapted logits (and re-estimates when `every` new images have come);
    `shift` is what `adapt_logits` adds for the current estimate, or None below the floor (`min_samples`) and inside
    the dead band. Not thread-safe: the caller serialises (the service holds a lock).

    Args:
        package: the package's priors.
        settings: method, window, decay, floor, smoothing, cap, dead band, cadence. An auto method is resolved here,
            once (`method`, `method_reason`).
        others: called at every re-estimate for other windows to merge, as (probabilities (n, C), times (n,))
            pairs (the server's other workers); None: this window alone.
        setting: how the user names the method setting, for messages and `method_reason`.
    """

    def __init__(self, package: PackagePrior, settings: EstimatorSettings | None = None,
                 others: Callable[[], Sequence[tuple[np.ndarray, np.ndarray]]] | None = None,
                 setting: str = "prior method") -> None:
        self.package = package
        self.settings = settings or EstimatorSettings()
        self.method, self.method_reason = resolve_method(self.settings.method, package, setting)
        self.window = PriorWindow(package.num_classes, self.settings.window)
        self.estimate = PriorEstimate(package.target.copy(), "target", 0, 0.0)
        self.shift: np.ndarray | None = None
        self.since = 0.0  # wall-clock time of the last reset: older images (of any window) are ignored
        self._others = others
        self._since_refresh = 0

    def observe(self, logits: np.ndarray, t: float | None = None) -> bool:
        """Record a batch of unadapted logits (N, C) float32; True when it triggered a re-estimate."""
        if self.record(logits, t):
            self.refresh()
            return True
        return False

    def record(self, logits: np.ndarray, t: float | None = None) -> bool:
        """Record a batch of unadapted logits (N, C) float32 without re-estimating; True when `every` new images
        have come since the last estimate (a server re-estimates off its request path)."""
        self.window.observe(logits, t)
        self._since_refresh += len(logits)
        return self._since_refresh >= self.settings.every

    def refresh(self, confidence: bool = False) -> PriorEstimate:
        """Re-estimate from this window plus the other windows, the newest `window` images by time.

        Args:
            confidence: also compute the standard errors (a C x C pseudo-inverse: for reports, not per batch).
        """
        s = self.settings
        mine = self.window.samples(probabilities=True)
        others = list(self._others()) if self._others is not None else []
        probs, times = merge_samples([mine, *others], s.window, self.since) if others or self.since else mine
        if len(times) == 0:
            probs = np.zeros((0, self.package.num_classes))
        weights = decay_weights(len(times), s.half_life)
        init = self.estimate.prior if self.estimate.estimated else None
        self.estimate = estimate_prior(probs, self.package, self.method, weights, min_samples=s.min_samples,
                                       pseudo_count=s.pseudo_count, init=init, confidence=confidence,
                                       probabilities=True)
        self.shift = (prior_shift(self.estimate.prior, self.package.source, s.max_shift, s.dead_band)
                      if self.estimate.estimated else None)
        self._since_refresh = 0
        return self.estimate

    def reset(self, at: float | None = None) -> None:
        """Forget every image seen before wall-clock time `at` (default now): back to the target prior, no shift."""
        self.since = time.time() if at is None else float(at)
        self.window.drop_before(self.since)
        self.estimate = PriorEstimate(self.package.target.copy(), "target", 0, 0.0)
        self.shift = None
        self._since_refresh = 0
