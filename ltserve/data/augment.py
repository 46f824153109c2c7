"""Training augmentation: NumPy and Pillow, producing uint8 (crop, crop, channels) like `transform_image`.

Stage 1 trains on it, and stage 2's `--no-cache` feeds crt and lws with it. The result is normalised by
`ltserve.preprocess.to_model_input`, the same function evaluation and serving use.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from ltserve.config import AugmentConfig, Config
from ltserve.preprocess import PreprocessSpec, arrays_are_model_sized, convert_mode, transform_image

class TrainTransform:
    """The training augmentation of `cfg.augment`, producing uint8 (crop, crop, channels) like `transform_image`.

    Order (torchvision's ImageNet / CIFAR recipes): random_resized_crop (else the evaluation resize + centre crop)
    -> pad_crop (zero padding, random crop back) -> hflip (p = 0.5) -> color_jitter (brightness, contrast,
    saturation factors in [1 - j, 1 + j], random order, Pillow's ImageEnhance as torchvision uses for PIL images).
    The result is normalised by `to_model_input(.., spec)`, the same function evaluation and serving use.

    Call it as `transform(img)` (own seeded generator) or `transform(img, rng)`; `load(imageset, i, rng)` takes the
    fast path for in-memory arrays that are already model-sized (Fashion-MNIST at 28 px: no Pillow at all).
    """

    RATIO = (3.0 / 4.0, 4.0 / 3.0)

    def __init__(self, augment: AugmentConfig, spec: PreprocessSpec, seed: int = 0):
        self.augment = augment
        self.spec = spec
        self._rng = np.random.default_rng(seed)

    @property
    def needs_pil(self) -> bool:
        """Whether an already model-sized uint8 array still needs Pillow (resampling or colour arithmetic)."""
        return self.augment.random_resized_crop or self.augment.color_jitter > 0

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        """Augment one Pillow image. Returns uint8 (crop, crop, channels)."""
        rng = self._rng if rng is None else rng
        spec, aug = self.spec, self.augment
        if aug.random_resized_crop:
            img = convert_mode(img, spec.channels)
            left, top, w, h = _rrc_box(img.size[0], img.size[1], (aug.scale_min, 1.0), self.RATIO, rng)
            # crop then resize, as torchvision's resized_crop does on PIL images
            img = img.crop((left, top, left + w, top + h)).resize(
                (spec.crop, spec.crop), Image.Resampling[spec.interpolation.upper()])
            arr = _as_hwc(np.asarray(img, dtype=np.uint8))
        else:
            arr = transform_image(img, spec)
        return self._finish(arr, rng)

    def from_array(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Augment a uint8 (crop, crop[, C]) array that `transform_image` would return unchanged (fast path)."""
        rng = self._rng if rng is None else rng
        arr = _as_hwc(arr)
        if arr.shape[2] != self.spec.channels:  # grey -> RGB replicates, exactly as Pillow's convert("RGB")
            arr = np.repeat(arr, self.spec.channels, axis=2)
        if self.augment.random_resized_crop:
            return self(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr), rng)
        return self._finish(arr, rng)

    def load(self, imageset: Any, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Augmented image `i` of an `ltserve.data.ImageSet`, via `from_array` when that is the same arithmetic."""
        if imageset.arrays is not None and arrays_are_model_sized(imageset.arrays, self.spec):
            return self.from_array(imageset.arrays[i], rng)
        return self(imageset.load(i), rng)

    def _finish(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        aug = self.augment
        if aug.pad_crop > 0:
            p = aug.pad_crop
            padded = np.pad(arr, ((p, p), (p, p), (0, 0)))
            top, left = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
            arr = padded[top:top + arr.shape[0], left:left + arr.shape[1]]
        if aug.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        if aug.color_jitter > 0:
            arr = _color_jitter(arr, aug.color_jitter, rng)
        return np.ascontiguousarray(arr)


def build_train_transform(cfg: Config, seed: int | None = None) -> TrainTransform:
    """The training augmentation of a recipe (`cfg.augment` on `cfg.preprocess`), e.g. for stage 2 `--no-cache`."""
    return TrainTransform(cfg.augment, cfg.preprocess, cfg.train.seed if seed is None else seed)


def _as_hwc(arr: np.ndarray) -> np.ndarray:
    return arr[:, :, None] if arr.ndim == 2 else arr


def _rrc_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: (left, top, w, h), 10 tries, then the central crop as a fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _color_jitter(arr: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast]
    if arr.shape[2] == 3:  # saturation is meaningless on grey images
        enhancers.append(ImageEnhance.Color)
    for k in rng.permutation(len(enhancers)):
        factor = float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
        img = enhancers[int(k)](img).enhance(factor)
    return _as_hwc(np.asarray(img, dtype=np.uint8))


