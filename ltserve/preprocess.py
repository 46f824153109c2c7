"""The one preprocessing definition shared by evaluation, the service and the batch CLI.

`PreprocessSpec` is written into every run (`run.json`) and model package (`model.json`); the same two functions
turn an image into model input everywhere, so there is no train/serve skew:

    transform_image(PIL image, spec) -> uint8 array (crop, crop, channels)   # resize shorter side, centre crop
    to_model_input([uint8 arrays]) -> float32 NCHW, normalised with spec.mean / spec.std

`decode(bytes, spec)` (bytes -> uint8 array) is the serving entry point built on `transform_image`.
NumPy and Pillow only: no torch.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class PreprocessSpec(BaseModel):
    """How an image becomes model input, in a small fixed vocabulary.

    Attributes:
        resize: the shorter side is resized to this many pixels (aspect ratio kept).
        crop: centre crop, square, in pixels; this is the model's input size.
        interpolation: resampling filter for the resize.
        mean, std: per-channel normalisation on [0, 1] pixel values; one value per channel.
        channels: 1 (grey) or 3 (RGB).
        allow_draft: JPEG decoding may downscale in the DCT domain (`Image.draft`) before the resize; faster on
            large photos, a small numerical change, so only packages that were evaluated that way allow it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: int = 32
    crop: int = 32
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    channels: Literal[1, 3] = 1
    allow_draft: bool = False

    @model_validator(mode="after")
    def _check(self) -> "PreprocessSpec":
        if self.crop > self.resize:
            raise ValueError(f"preprocess.crop ({self.crop}) must not exceed preprocess.resize ({self.resize})")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"preprocess.mean and preprocess.std need {self.channels} values (one per channel), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocess.std values must be > 0")
        return self

    @property
    def input_size(self) -> int:
        """Side of the square model input, in pixels."""
        return self.crop


def convert_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to 'L' (channels=1) or 'RGB' (channels=3), correctly.

    Handles palette (with transparency), RGBA/LA (composited on white), CMYK, and 16/32-bit grey ('I;16', 'I', 'F',
    scaled to 8 bits rather than clipped).
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "F" and float(arr.max()) <= 1.0:
            hi = 1.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
        mode = "RGB"
    target = "L" if channels == 1 else "RGB"
    return img if mode == target else img.convert(target)


def transform_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to `spec.resize`, centre-crop `spec.crop`, convert to the spec's channels.

    Args:
        img: a Pillow image of any mode and size.
        spec: the preprocessing spec.

    Returns:
        uint8 array of shape (crop, crop, channels).
    """
    img = convert_mode(img, spec.channels)
    w, h = img.size
    if min(w, h) != spec.resize:
        scale = spec.resize / min(w, h)
        # round like torchvision's Resize(int): the shorter side is exactly `resize`
        new_w = spec.resize if w <= h else max(1, int(round(w * scale)))
        new_h = spec.resize if h <= w else max(1, int(round(h * scale)))
        img = img.resize((new_w, new_h), _PIL_INTERPOLATION[spec.interpolation])
        w, h = new_w, new_h
    if (w, h) != (spec.crop, spec.crop):
        left = int(round((w - spec.crop) / 2.0))
        top = int(round((h - spec.crop) / 2.0))
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def to_model_input(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Stack uint8 (H, W, C) images into normalised float32 NCHW.

    Args:
        images: uint8 arrays of shape (crop, crop, channels), as `transform_image` or `decode` return.
        spec: the preprocessing spec (mean, std).

    Returns:
        float32 array of shape (N, channels, crop, crop): (pixel / 255 - mean) / std.
    """
    batch = np.stack([np.asarray(a, dtype=np.uint8).reshape(spec.crop, spec.crop, spec.channels) for a in images])
    x = batch.astype(np.float32) * np.float32(1.0 / 255.0)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
