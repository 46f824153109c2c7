"""Target class prior: shift every head towards the class mix of the traffic it will serve.

A head re-balanced for a uniform (balanced) test set predicts p(y | x) for pi_target uniform; adding
log(pi_target_j) to the bias moves it to another prior:

    uniform  adds log(1 / C), a constant: nothing changes (no shift is stored);
    train    adds log(pi_j), pi_j = n_j / N, back (the training mix);
    FILE     C non-negative weights, normalised to sum 1 (JSON list, JSON {class name: weight}, or numbers separated
             by white space / commas / new lines).

Here the spec becomes log pi_target; `ltserve.heads.apply_target_prior` adds it to a head (and records it, so
`strip_target_prior` can recover the raw re-balanced head, e.g. to compose tau_norm+la from a saved tau_norm head).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.errors import ConfigError


def read_prior_file(path: str | Path, class_names: Sequence[str]) -> np.ndarray:
    """C class weights from a file, normalised to sum 1.

    Raises:
        ConfigError: the file is missing, unparsable, has the wrong number of values, a negative / non-finite value,
            all zeros, or unknown class names (the message names the file and the fix).
    """
    p = Path(path)
    c = len(class_names)
    if not p.is_file():
        raise ConfigError(f"--target-prior {p}: file not found; give 'uniform', 'train' or a file of {c} class "
                          "weights")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(text)
            if isinstance(raw, dict):
                unknown = sorted(set(raw) - set(class_names))
                if unknown:
                    raise ConfigError(f"{p}: unknown class names {unknown}; the classes are {list(class_names)}")
                raw = [float(raw.get(name, 0.0)) for name in class_names]
            weights = np.asarray(raw, dtype=np.float64)
        else:
            weights = np.asarray([float(t) for t in re.split(r"[\s,]+", text.strip()) if t], dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{p}: cannot read class weights ({exc}); write {c} numbers, one per class in label "
                          "order") from None
    if weights.shape != (c,):
        raise ConfigError(f"{p}: {weights.size} weights for {c} classes; write one weight per class in label order")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(f"{p}: class weights must be finite, >= 0 and not all 0")
    return weights / weights.sum()


def target_log_prior(spec: str, class_counts: Sequence[int],
                     class_names: Sequence[str]) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The log target prior to add to every head's bias, and its description for meta.

    Args:
        spec: "uniform", "train" or a file path.
        class_counts: training counts (C,).
        class_names: C names (a JSON file may name its weights).

    Returns:
        (log pi_target (C,) float64, or None for uniform (a constant shift is a no-op), meta dict).
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if spec == "uniform":
        return None, {"kind": "uniform"}
    if spec == "train":
        pi = counts / counts.sum()
        return np.log(pi), {"kind": "train", "weights": pi.tolist()}
    pi = read_prior_file(spec, class_names)
    with np.errstate(divide="ignore"):
        # a zero weight means "never predict this class": log 0 = -inf is folded as a very negative finite bias
        lp = np.maximum(np.log(pi), np.log(np.finfo(np.float32).tiny))
    return lp, {"kind": "file", "file": str(spec), "weights": pi.tolist()}
