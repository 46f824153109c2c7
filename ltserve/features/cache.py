"""The run's feature cache (`cache/`): the frozen backbone's features of each split, the input of stage 2 and of
evaluation.

    cached_features(run, "train" | "val" | "test") -> (features (N, D) float32, labels (N,) int64)

The cache holds `cache/<split>.safetensors` (features in `rebalance.cache_dtype`, float16 by default, and labels)
and `cache/<split>.json` (dtype, shape, backbone sha256, data fingerprint, preprocess spec). It is reused while all
of these match the run, and rebuilt, with a log line saying why, when the backbone (backbone.safetensors) or the
data (run.json's fingerprint) changed. Features are returned after the round trip through the cache dtype whether
the cache was hit or built, so results do not depend on whether the cache existed.

Building an entry reads the data set (once per process: `splits_for`) and runs the backbone: the run's own from
`backbone.safetensors`, or the one given (stage 1 passes the model it has just trained).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ltserve.config import DataConfig
from ltserve.errors import RunError
from ltserve.fileio import atomic_write, sha256_file, write_json
from ltserve.preprocess import PreprocessSpec
from ltserve.rundir import Run, RunPaths, open_run

if TYPE_CHECKING:
    from torch import nn

    from ltserve.data import ImageSet, Splits

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
CACHE_FORMAT = 1
_SPLITS: dict[str, "Splits"] = {}
_SPLITS_MAX = 4
_SHA: dict[tuple[str, int, int], str] = {}


# ----------------------------------------------------------------------------------------------------------------
# Splits, remembered per process (building them reads the data set)
# ----------------------------------------------------------------------------------------------------------------


def _data_key(data: DataConfig) -> str:
    return json.dumps(data.model_dump(mode="json"), sort_keys=True)


def remember_splits(data: DataConfig, splits: "Splits") -> None:
    """Keep `splits` for `data` in this process, so later `splits_for(data)` calls do not re-read the data set."""
    _SPLITS.pop(_data_key(data), None)
    _SPLITS[_data_key(data)] = splits
    while len(_SPLITS) > _SPLITS_MAX:  # oldest first: dicts keep insertion order
        _SPLITS.pop(next(iter(_SPLITS)))


def splits_for(data: DataConfig) -> "Splits":
    """`ltserve.data.load_splits(data)`, computed once per process and data config (the splits are deterministic)."""
    key = _data_key(data)
    if key not in _SPLITS:
        from ltserve.data import load_splits

        remember_splits(data, load_splits(data))
    return _SPLITS[key]


def run_splits(run: Run) -> "Splits":
    """The run's splits, checked against its data fingerprint.

    Raises:
        RunError: the data set on disk is not the one the run was trained on.
    """
    splits = splits_for(run.config.data)
    if splits.fingerprint != run.info.data_fingerprint:
        raise RunError(f"{run.paths.run_json}: the data set on disk (fingerprint {splits.fingerprint}) is not the "
                       f"one this run was trained on ({run.info.data_fingerprint}); restore that data (data.root) or "
                       "retrain")
    return splits


def split_images(splits: "Splits", split: str, where: Path) -> "ImageSet":
    """One split's image set.

    Raises:
        RunError: no such split, or it is empty.
    """
    if split not in ("train", "val", "test"):
        raise RunError(f"split {split!r} is not one of train, val, test")
    imageset = getattr(splits, split)
    if imageset is None or len(imageset) == 0:
        raise RunError(f"{where}: the run has no {split} split (data.{split} / val_per_class / test_fraction); "
                       "choose another split")
    return imageset


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


def backbone_sha256(run: Run | str | Path) -> str:
    """sha256 of the run's backbone.safetensors (remembered per file size and mtime in this process)."""
    path = (run.paths if isinstance(run, Run) else RunPaths(run)).backbone
    if not path.is_file():
        raise RunError(f"{path}: not found; train the run first (`ltserve train CONFIG.yaml --out {path.parent}`)")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = sha256_file(path)
    return _SHA[key]


def _expected_meta(split: str, dtype: str, sha: str, fingerprint: str, spec: PreprocessSpec) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "split": split, "dtype": dtype, "backbone_sha256": sha,
            "data_fingerprint": fingerprint, "preprocess": spec.model_dump(mode="json")}


def _stale_reason(meta_path: Path, st_path: Path, expected: dict[str, Any]) -> str | None:
    """Why the cache entry cannot be used, or None when it can."""
    if not meta_path.is_file() or not st_path.is_file():
        return "no cache yet"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {meta_path.name} ({exc})"
    names = {"backbone_sha256": "the backbone changed", "data_fingerprint": "the data changed",
             "preprocess": "the preprocessing changed", "dtype": "the cache dtype changed",
             "format": "the cache format changed", "split": "it belongs to another split"}
    for key, why in names.items():
        if meta.get(key) != expected[key]:
            return f"{why} ({key} {str(meta.get(key))[:16]} -> {str(expected[key])[:16]})"
    return None


def _read_cache(st_path: Path, meta_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(st_path))
        meta = json.loads(meta_path.read_text())
        feats, labels = tensors["features"], tensors["labels"]
    except Exception as exc:  # a truncated or foreign file: rebuild it
        log.warning("%s: unreadable cache (%s); rebuilding it", st_path, exc)
        return None
    if list(feats.shape) != meta.get("shape") or labels.shape != (feats.shape[0],):
        log.warning("%s: shape %s does not match %s; rebuilding it", st_path, feats.shape, meta_path.name)
        return None
    return feats.astype(np.float32), labels.astype(np.int64)


def _write_cache(st_path: Path, meta_path: Path, feats: np.ndarray, labels: np.ndarray,
                 meta: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    tensors = {"features": np.ascontiguousarray(feats), "labels": np.ascontiguousarray(labels, dtype=np.int64)}
    atomic_write(st_path, lambda tmp: save_file(tensors, str(tmp)))
    # written last: a cache entry is valid only once its JSON exists
    write_json(meta_path, {**meta, "shape": list(feats.shape), "n": int(feats.shape[0])})


def cached_features(run: Run | str | Path, split: Split, use_cache: bool = True, device: Any = None,
                    backbone: "nn.Module | None" = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features of one split under the run's frozen backbone, from `cache/` when it is valid.

    Args:
        run: a trained run (a `Run`, or its directory).
        split: "train", "val" or "test".
        use_cache: False extracts fresh float32 features and neither reads nor writes the cache.
        device: where the backbone runs; None picks CUDA when available, else CPU.
        backbone: the run's backbone already in memory (stage 1's trained model); None loads backbone.safetensors
            when the cache must be built.
        progress: show a progress bar while extracting (on a terminal).

    Returns:
        (features (N, D) float32, labels (N,) int64), in the split's order.

    Raises:
        RunError: not a run, no such split, or the data set on disk no longer matches the run's fingerprint.
    """
    run = open_run(run)
    paths = run.paths
    dtype = run.config.rebalance.cache_dtype
    expected = _expected_meta(split, dtype, backbone_sha256(paths.root), run.info.data_fingerprint,
                              run.config.preprocess)
    st_path, meta_path = paths.cache / f"{split}.safetensors", paths.cache / f"{split}.json"
    if use_cache:
        reason = _stale_reason(meta_path, st_path, expected)
        if reason is None:
            hit = _read_cache(st_path, meta_path)
            if hit is not None:
                log.debug("cache %s: reused", st_path)
                return hit
            reason = "unreadable cache file"
        log.info("cache %s: building (%s)", st_path, reason)
    feats, labels = _extract_split(run, split, device, backbone, progress)
    if not use_cache:
        return feats, labels
    stored = feats.astype(dtype)
    _write_cache(st_path, meta_path, stored, labels, expected)
    return stored.astype(np.float32), labels


def _extract_split(run: Run, split: str, device: Any, backbone: "nn.Module | None",
                   progress: bool) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from ltserve.features.backbones import load_run_backbone
    from ltserve.features.extract import extract_features

    imageset = split_images(run_splits(run), split, run.paths.root)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if backbone is None:
        backbone = load_run_backbone(run, device)
    cfg = run.config
    feats = extract_features(backbone, imageset, cfg.preprocess, batch_size=cfg.train.eval_batch_size,
                             device=device, num_workers=cfg.train.num_workers, progress=progress)
    return feats, imageset.labels.astype(np.int64)
