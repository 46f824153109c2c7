"""Frozen-backbone features and the run's feature cache (`cache/`), the input of stage 2 and evaluation.

    extract_features(backbone, imageset, spec) -> (N, D) float32     # eval mode, no grad, the serving transform
    cached_features(run_dir, "train" | "val" | "test") -> (features (N, D) float32, labels (N,) int64)

The cache holds `cache/<split>.safetensors` (features in `rebalance.cache_dtype`, float16 by default, and labels)
and `cache/<split>.json` (dtype, shape, backbone sha256, data fingerprint, preprocess spec). It is reused while all
of these match the run, and rebuilt, with a log line saying why, when the backbone (backbone.safetensors) or the
data (run.json's fingerprint) changed. Features are returned after the round trip through the cache dtype whether
the cache was hit or built, so results do not depend on whether the cache existed.

Images go through exactly `ltserve.preprocess.transform_image` + `to_model_input` (what the model package serves);
for in-memory arrays that are already model-sized (Fashion-MNIST at 28 px) that transform is the identity and is
skipped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from ltserve.config import DataConfig, config_from_dict
from ltserve.errors import RunError
from ltserve.preprocess import PreprocessSpec, to_model_input, transform_image
from ltserve.rundir import RunPaths, read_run, sha256_file

if TYPE_CHECKING:
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


def _imageset(splits: "Splits", split: str, where: Path) -> "ImageSet":
    if split not in ("train", "val", "test"):
        raise RunError(f"split {split!r} is not one of train, val, test")
    imageset = getattr(splits, split)
    if imageset is None or len(imageset) == 0:
        raise RunError(f"{where}: the run has no {split} split (data.{split} / val_per_class / test_fraction); "
                       "choose another split")
    return imageset


# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------


class _ImagesForModel(torch.utils.data.Dataset):
    """Item i -> uint8 (crop, crop, C): `transform_image(load(i))`, or a custom transform (e.g. training augment)."""

    def __init__(self, imageset: "ImageSet", spec: PreprocessSpec, transform: Callable | None):
        self.imageset, self.spec, self.transform = imageset, spec, transform

    def __len__(self) -> int:
        return len(self.imageset)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.transform is None:
            return transform_image(self.imageset.load(i), self.spec)
        if hasattr(self.transform, "load"):  # ltserve.train.TrainTransform: takes the in-memory fast path itself
            return self.transform.load(self.imageset, i)
        return self.transform(self.imageset.load(i))


def _batches(imageset: "ImageSet", spec: PreprocessSpec, batch_size: int, transform: Callable | None,
             num_workers: int):
    """Float32 NCHW model-input batches of the whole image set, in order."""
    n = len(imageset)
    if transform is None and imageset.arrays is not None and arrays_are_model_sized(imageset.arrays, spec):
        # transform_image is the identity here (same size, grey -> grey or replicated RGB): skip Pillow
        for start in range(0, n, batch_size):
            chunk = imageset.arrays[start:start + batch_size]
            if chunk.ndim == 3:
                chunk = chunk[..., None]
            if chunk.shape[3] != spec.channels:
                chunk = np.repeat(chunk, spec.channels, axis=3)
            yield torch.from_numpy(to_model_input(chunk, spec))
        return
    loader = torch.utils.data.DataLoader(
        _ImagesForModel(imageset, spec, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=functools.partial(_stack, spec=spec))
    yield from loader


def _stack(items: list[np.ndarray], spec: PreprocessSpec) -> torch.Tensor:
    return torch.from_numpy(to_model_input(items, spec))


def arrays_are_model_sized(arrays: np.ndarray, spec: PreprocessSpec) -> bool:
    """True when `transform_image` is the identity on these uint8 (N, H, W[, C]) arrays (up to grey -> RGB)."""
    if arrays.dtype != np.uint8 or arrays.ndim not in (3, 4):
        return False
    channels = 1 if arrays.ndim == 3 else arrays.shape[3]
    same_size = arrays.shape[1] == arrays.shape[2] == spec.resize == spec.crop
    # RGB -> grey goes through Pillow's weighted sum, so only grey -> grey/RGB and RGB -> RGB are shortcuts
    return same_size and (channels == 1 or channels == spec.channels)


@torch.no_grad()
def extract_features(backbone: nn.Module, imageset: "ImageSet", spec: PreprocessSpec, batch_size: int = 256,
                     device: str | torch.device = "cpu", transform: Callable | None = None,
                     num_workers: int = 0) -> np.ndarray:
    """Pooled features of every image of `imageset`, in order, with the backbone in eval mode.

    Args:
        backbone: a module with `forward_features` and `forward_head(x, pre_logits=True)` (ltserve.models).
        imageset: an `ltserve.data.ImageSet`.
        spec: the run's preprocessing (resize, crop, mean/std, channels).
        batch_size: images per forward pass.
        device: where the backbone runs (it is moved there).
        transform: PIL image -> uint8 (crop, crop, C) instead of `transform_image` (e.g.
            `ltserve.train.build_train_transform(cfg)` for augmented features); None for the serving transform.
        num_workers: DataLoader processes decoding files (0: in this process).

    Returns:
        (N, D) float32 features.
    """
    from tqdm import tqdm

    device = torch.device(device)
    was_training = backbone.training
    backbone = backbone.to(device).eval()
    out: list[np.ndarray] = []
    total = -(-len(imageset) // batch_size)
    try:
        for x in tqdm(_batches(imageset, spec, batch_size, transform, num_workers), total=total, unit="batch",
                      desc="features", leave=False, disable=total < 2):
            x = x.to(device, non_blocking=True)
            feats = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
            out.append(feats.float().cpu().numpy())
    finally:
        backbone.train(was_training)
    if not out:
        return np.zeros((0, int(getattr(backbone, "num_features", 0))), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


def backbone_sha256(run_dir: str | Path) -> str:
    """sha256 of the run's backbone.safetensors (remembered per file size and mtime in this process)."""
    path = RunPaths(run_dir).backbone
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

    tmp = st_path.with_name(f".{st_path.name}.{os.getpid()}.tmp")
    save_file({"features": np.ascontiguousarray(feats), "labels": np.ascontiguousarray(labels, dtype=np.int64)},
              str(tmp))
    tmp.replace(st_path)
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps({**meta, "shape": list(feats.shape), "n": int(feats.shape[0])}, indent=2))
    tmp_meta.replace(meta_path)  # written last: a cache entry is valid only once its JSON exists


def cached_features(run_dir: str | Path, split: Split, use_cache: bool = True,
                    device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features of one split under the run's frozen backbone, from `cache/` when it is valid.

    The split is rebuilt from run.json's resolved config (`load_splits` is deterministic; once per process).

    Args:
        run_dir: a trained run directory.
        split: "train", "val" or "test".
        use_cache: False extracts fresh float32 features and neither reads nor writes the cache.
        device: where the backbone runs; None picks CUDA when available, else CPU.

    Returns:
        (features (N, D) float32, labels (N,) int64), in the split's order.

    Raises:
        RunError: not a run, no such split, or the data set on disk no longer matches the run's fingerprint.
    """
    paths = RunPaths(run_dir)
    info = read_run(paths.root)
    cfg = config_from_dict(info.config, str(paths.run_json))
    dtype = cfg.rebalance.cache_dtype
    expected = _expected_meta(split, dtype, backbone_sha256(paths.root), info.data_fingerprint, cfg.preprocess)
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
    feats, labels = _extract_split(paths, info.data_fingerprint, cfg, split, device)
    if not use_cache:
        return feats, labels
    stored = feats.astype(dtype)
    paths.cache.mkdir(parents=True, exist_ok=True)
    _write_cache(st_path, meta_path, stored, labels, expected)
    return stored.astype(np.float32), labels


def _extract_split(paths: RunPaths, fingerprint: str, cfg, split: str,
                   device: str | torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    from ltserve.models import load_run_backbone

    splits = splits_for(cfg.data)
    if splits.fingerprint != fingerprint:
        raise RunError(f"{paths.run_json}: the data set on disk (fingerprint {splits.fingerprint}) is not the one "
                       f"this run was trained on ({fingerprint}); restore that data (data.root) or retrain")
    imageset = _imageset(splits, split, paths.root)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, _ = load_run_backbone(paths.root, device)
    feats = extract_features(backbone, imageset, cfg.preprocess, batch_size=cfg.train.eval_batch_size,
                             device=device, num_workers=cfg.train.num_workers)
    return feats, imageset.labels.astype(np.int64)
