"""JPEG decoding on the GPU for the torch backend: encoded bytes in, model-ready uint8 pixels on the device out.

    DeviceDecoder(spec, device="cuda").decode(list of bytes) -> uint8 (N, crop, crop, C) tensor on the device
                                                                (hand it to `TorchRunner.run_pixels`)

Every file's header is read on the CPU first (`ltserve.preprocess.read_header`: format sniffing, header parsing and
the pixel cap, before any pixel is decoded), so bad files get the same 4xx errors as the CPU path. Baseline RGB or grey
JPEGs without an EXIF rotation, for a spec whose resize filter torch has (bilinear, bicubic), are decoded together
with `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, batched), then resized (antialiased, like
Pillow) and centre-cropped on the device with `ltserve.preprocess.resize_geometry`'s numbers. Everything else (PNG,
WebP, BMP, GIF, TIFF, PNM, progressive or CMYK JPEGs, EXIF-rotated photos, nearest/lanczos specs, and any JPEG the
device decoder rejects) goes through the CPU decoder, `ltserve.preprocess.decode`, unchanged.

How close the two paths are is measured, not assumed: on CPU here with `device="cpu"` (tests/runtime/test_device_decode.py),
on a GPU by `benchmarks/gpu_preprocess_check.py` (top-1 agreement and many/medium/few accuracy against the CPU path).

torch and torchvision are imported when a decoder is made, never at import time.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ltserve.preprocess import (DEFAULT_MAX_PIXELS, ImageHeader, PreprocessSpec, decode, read_header,
                                resize_geometry)

log = logging.getLogger(__name__)

DEVICE_FILTERS = ("bilinear", "bicubic")
"""Resize filters with an antialiased torch equivalent (`torch.nn.functional.interpolate(antialias=True)`)."""


def device_decodable(header: ImageHeader, spec: PreprocessSpec) -> bool:
    """Whether the device decoder takes this file: a baseline RGB or grey JPEG, upright, and a filter torch has.

    Args:
        header: the file's header (`read_header`).
        spec: the package's preprocessing spec.

    Returns:
        True for the device decoder; False for the CPU decoder.
    """
    return (header.format == "JPEG" and header.mode in ("RGB", "L") and not header.progressive
            and header.orientation in (None, 1) and spec.interpolation in DEVICE_FILTERS)


class DeviceDecoder:
    """Decodes a batch of encoded images into model-ready uint8 pixels on a torch device.

    Args:
        spec: the package's preprocessing spec (resize, crop, interpolation, channels).
        device: "cuda" (nvJPEG), or "cpu" (torchvision's libjpeg-turbo decoder: how the tests check the device
            path's resize and crop arithmetic here).
        max_pixels: cap on width * height, checked from the header before decoding.

    Attributes:
        counts: files decoded on the device and on the CPU so far ({"device": n, "cpu": n}).
    """

    def __init__(self, spec: PreprocessSpec, device: str = "cuda", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        import torch
        import torchvision.io

        self._torch, self._io = torch, torchvision.io
        self.spec = spec
        self.device = torch.device(device)
        self.max_pixels = int(max_pixels)
        self.counts = {"device": 0, "cpu": 0}

    def decode(self, items: Sequence[bytes]) -> Any:
        """Decode, resize and crop every file: JPEGs the device takes on the device (one batched call), the rest
        with the CPU decoder.

        Args:
            items: encoded files.

        Returns:
            uint8 tensor (N, crop, crop, channels) on the decoder's device, in the order of `items`.

        Raises:
            InvalidImage (400), UnsupportedFormat (415), ImageTooLarge (413): for the first file the CPU path would
                refuse, with its message (headers are all read before anything is decoded).
        """
        torch = self._torch
        headers = [read_header(data, self.max_pixels) for data in items]
        on_device = [i for i, h in enumerate(headers) if device_decodable(h, self.spec)]
        out: list[Any] = [None] * len(items)
        for i, pixels in zip(on_device, self._decode_jpegs([items[i] for i in on_device])):
            out[i] = pixels
        for i, data in enumerate(items):
            if out[i] is None:  # the CPU decoder: every other format, and JPEGs the device refused
                out[i] = torch.tensor(decode(data, self.spec, self.max_pixels), device=self.device)  # a copy
                self.counts["cpu"] += 1
            else:
                self.counts["device"] += 1
        return torch.stack(out) if out else torch.empty((0, self.spec.crop, self.spec.crop, self.spec.channels),
                                                         dtype=torch.uint8, device=self.device)

    def verify(self, tolerance: int = 8, seed: int = 0) -> dict[str, Any]:
        """Compare this decoder with the CPU path on a few synthetic baseline JPEGs (before it is used).

        The images are smooth gradients with noise, landscape and portrait, larger and smaller than the spec's
        resize, so the resize, the crop and (for a grey spec) the luma conversion are all exercised.

        Args:
            tolerance: largest pixel difference (0-255) allowed; JPEG decoders (libjpeg-turbo, nvJPEG) round the
                IDCT and chroma upsampling differently, and the resize runs in float here, in 8-bit passes in Pillow.
            seed: noise seed.

        Returns:
            {"passed", "max_pixel_diff", "mean_pixel_diff", "images", "tolerance"}.
        """
        import io

        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        r = self.spec.resize
        files = []
        for w, h in ((2 * r + 37, r + 11), (r + 5, 3 * r // 2), (r // 2 + 3, r // 2 + 9), (r, r)):
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=2)
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            files.append(buf.getvalue())
        got = self.decode(files).cpu().numpy().astype(np.int16)
        want = np.stack([decode(d, self.spec, self.max_pixels) for d in files]).astype(np.int16)
        diff = np.abs(got - want)
        return {"passed": bool(diff.max() <= tolerance), "max_pixel_diff": int(diff.max()),
                "mean_pixel_diff": float(diff.mean()), "images": len(files), "tolerance": tolerance}

    def _decode_jpegs(self, items: Sequence[bytes]) -> list[Any]:
        """Device-decoded, resized and cropped (crop, crop, C) uint8 tensors; None where the device refused a file."""
        if not items:
            return []
        torch, io = self._torch, self._io
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in items]
        try:
            images = io.decode_jpeg(tensors, mode=io.ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the batch: decode one by one, the refused ones go to the CPU
            images = [self._decode_one(t) for t in tensors]
        return [None if img is None else self.transform(img) for img in images]

    def _decode_one(self, data: Any) -> Any:
        io = self._io
        try:
            return io.decode_jpeg(data, mode=io.ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            log.debug("device JPEG decoder refused a file (%s): CPU decoder instead", exc)
            return None

    def transform(self, image: Any) -> Any:
        """`ltserve.preprocess.transform_image` on the device: uint8 RGB (3, H, W) -> uint8 (crop, crop, C).

        Grey is Pillow's RGB -> L conversion (ITU-R 601-2 luma, its fixed-point rounding); the resize is
        antialiased `interpolate` (Pillow's filters, computed in float rather than Pillow's 8-bit passes), rounded
        to uint8; the crop is `resize_geometry`'s.
        """
        torch, spec = self._torch, self.spec
        x = image
        if spec.channels == 1:  # Pillow: L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16
            rgb = x.to(torch.int32)
            x = ((rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16).to(torch.uint8)[None]
        _, h, w = x.shape
        new_w, new_h, left, top = resize_geometry(w, h, spec)
        if (new_w, new_h) != (w, h):
            y = torch.nn.functional.interpolate(x[None].float(), size=(new_h, new_w), mode=spec.interpolation,
                                                antialias=True, align_corners=False)
            x = y[0].round_().clamp_(0, 255).to(torch.uint8)
        x = x[:, top:top + spec.crop, left:left + spec.crop]
        return x.permute(1, 2, 0).contiguous()
