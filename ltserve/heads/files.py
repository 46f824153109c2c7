"""A head on disk: `heads/<name>.safetensors` (weight, bias, centre, extras) + `heads/<name>.json` (the rest)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ltserve.errors import RunError
from ltserve.fileio import atomic_write, write_json
from ltserve.heads.head import CalibratedHead
from ltserve.heads.registry import HEADS


def save_head(head: CalibratedHead, heads_dir: str | Path) -> Path:
    """Write `heads/<method>.safetensors` (weight, bias, centre, extras), then `heads/<method>.json`.

    Returns:
        the path of the .safetensors file.
    """
    from safetensors.numpy import save_file

    heads_dir = Path(heads_dir)
    # safetensors.numpy writes the raw buffer: a transposed (Fortran-order) array would be saved scrambled
    tensors = {"weight": np.ascontiguousarray(head.weight), "bias": np.ascontiguousarray(head.bias)}
    if head.centre is not None:
        tensors["centre"] = np.ascontiguousarray(head.centre)
    for name, arr in head.extras.items():
        tensors[f"extras.{name}"] = np.ascontiguousarray(arr)
    st_path = atomic_write(heads_dir / f"{head.method}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(heads_dir / f"{head.method}.json", {
        "method": head.method, "feature_transform": head.feature_transform, "temperature": head.temperature,
        "num_classes": head.num_classes, "num_features": head.num_features, "meta": head.meta})
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
    """Registered head names present in a run's `heads/` folder, in registry order."""
    heads_dir = Path(heads_dir)
    return [h for h in HEADS.names()
            if (heads_dir / f"{h}.safetensors").is_file() and (heads_dir / f"{h}.json").is_file()]


def head_sha256(heads_dir: str | Path, method: str) -> str:
    """Hex sha256 of `heads/<method>.safetensors` followed by `heads/<method>.json`: which head file a number was
    computed on (any re-fit or re-calibration changes it).

    Raises:
        RunError: a file is missing.
    """
    h = hashlib.sha256()
    for p in (Path(heads_dir) / f"{method}.safetensors", Path(heads_dir) / f"{method}.json"):
        if not p.is_file():
            raise RunError(f"{p}: head {method!r} not found")
        h.update(p.read_bytes())
    return h.hexdigest()

