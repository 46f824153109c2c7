"""The one head value every stage-2 method returns, and its folding arithmetic (NumPy only).

A `CalibratedHead` is already a linear layer: logits = (transform(x) @ weight.T + bias) / temperature.
Each method writes its re-balancing into `weight` and `bias` (see `../shared/reference/decoupling.md`, "Folding"):

    tau_norm: W'_j = W_j / max(||W_j||, eps)^tau, b' = 0 (or b with keep_bias)
    lws:      W'_j = f_j W_j, b'_j = f_j b_j
    la:       b'_j = b_j - tau_la log pi_j (+ log pi_target_j)
    ncm:      W' = 2 C, b'_j = -||c_j||^2 after x -> (x - mu) / ||x - mu||  (euclidean)
              W' = C_j / ||C_j||, b' = 0 after the same normalisation            (cosine)

and keeps the parameters that produced them (tau, scales, tau_la, prior, ...) in `meta` and `extras`, so tests and
export can recompute the unfolded logits independently. `folded()` gives the single Gemm that export writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ltserve.errors import RunError

FeatureTransform = Literal["none", "centred_l2"]
L2_EPS = 1e-12


@dataclass(frozen=True)
class CalibratedHead:
    """A linear classifier on pooled features, possibly after a fixed normalisation.

    Attributes:
        weight: (C, D) float32.
        bias: (C,) float32.
        method: head name (joint, crt, tau_norm, lws, ncm, la, tau_norm+la, lws+la).
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

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The single Gemm export writes: (W / T, b / T), shapes (C, D) and (C,), float32."""
        t = np.float32(self.temperature)
        return self.weight / t, self.bias / t

    def with_temperature(self, temperature: float, **meta: Any) -> "CalibratedHead":
        """The same head with a calibration temperature (argmax unchanged)."""
        return replace(self, temperature=float(temperature), meta={**self.meta, **meta})


def save_head(head: CalibratedHead, heads_dir: str | Path) -> Path:
    """Write `heads/<method>.safetensors` (weight, bias, centre, extras) and `heads/<method>.json`.

    Returns:
        the path of the .safetensors file.
    """
    from safetensors.numpy import save_file

    heads_dir = Path(heads_dir)
    heads_dir.mkdir(parents=True, exist_ok=True)
    # safetensors.numpy writes the raw buffer: a transposed (Fortran-order) array would be saved scrambled
    tensors = {"weight": np.ascontiguousarray(head.weight), "bias": np.ascontiguousarray(head.bias)}
    if head.centre is not None:
        tensors["centre"] = np.ascontiguousarray(head.centre)
    for name, arr in head.extras.items():
        tensors[f"extras.{name}"] = np.ascontiguousarray(arr)
    st_path = heads_dir / f"{head.method}.safetensors"
    json_path = heads_dir / f"{head.method}.json"
    info = {
        "method": head.method,
        "feature_transform": head.feature_transform,
        "temperature": head.temperature,
        "num_classes": head.num_classes,
        "num_features": head.num_features,
        "meta": head.meta,
    }
    _atomic_write_bytes(st_path, lambda tmp: save_file(tensors, str(tmp)))
    _atomic_write_bytes(json_path, lambda tmp: tmp.write_text(json.dumps(info, indent=2, default=_json_default)))
    return st_path


def load_head(heads_dir: str | Path, method: str) -> CalibratedHead:
    """Read `heads/<method>.safetensors` + `.json`.

    Raises:
        RunError: a file is missing or inconsistent (the message names it and says how to make it).
    """
    from safetensors.numpy import load_file

    heads_dir = Path(heads_dir)
    st_path, json_path = heads_dir / f"{method}.safetensors", heads_dir / f"{method}.json"
    for p in (st_path, json_path):
        if not p.is_file():
            hint = ("train the run first" if method == "joint"
                    else f"run `ltserve rebalance {heads_dir.parent} --heads {method}`")
            raise RunError(f"{p}: head {method!r} not found; {hint}")
    try:
        info = json.loads(json_path.read_text())
        tensors = load_file(str(st_path))
    except Exception as exc:  # a truncated or foreign file
        raise RunError(f"{st_path}: cannot read head {method!r}: {exc}") from exc
    extras = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("extras.")}
    return CalibratedHead(
        weight=tensors["weight"], bias=tensors["bias"], method=info["method"],
        feature_transform=info.get("feature_transform", "none"), centre=tensors.get("centre"),
        temperature=float(info.get("temperature", 1.0)), meta=info.get("meta", {}), extras=extras,
    )


def list_heads(heads_dir: str | Path) -> list[str]:
    """Head names present in a run's `heads/` folder, in the canonical order."""
    from ltserve.config import HEAD_NAMES

    heads_dir = Path(heads_dir)
    return [h for h in HEAD_NAMES if (heads_dir / f"{h}.safetensors").is_file() and (heads_dir / f"{h}.json").is_file()]


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
