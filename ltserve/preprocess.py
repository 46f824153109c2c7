"""The one preprocessing definition shared by evaluation, the service and the batch CLI.

`PreprocessSpec` is written into every run (`run.json`) and model package (`model.json`); the same two functions
turn an image into model input everywhere, so there is no train/serve skew:

    transform_image(PIL image, spec) -> uint8 array (crop, crop, channels)   # resize shorter side, centre crop
    to_model_input([uint8 arrays]) -> float32 NCHW, normalised with spec.mean / spec.std
        = normalize_pixels(stack_pixels([uint8 arrays]))   # the split point: uint8 NHWC in between

`stack_pixels` is what a runner that normalises on its device (the torch runner's `device_preprocess`) receives:
the same pixels, a quarter of the bytes; `normalize_pixels` is the arithmetic such a runner repeats there, and
`resize_geometry` the resize and crop arithmetic a device-side decoder repeats.

`decode(bytes, spec)` (bytes -> uint8 array) is the serving entry point built on `transform_image`.
`IMAGE_FORMATS` is the one list of accepted image formats (Pillow name, file extensions, magic number): training's
folder reader, evaluation, `ltserve predict` and the service all read it, so a model serves every format it trained on.
NumPy and Pillow only: no torch.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, model_validator

from ltserve.errors import ImageTooLarge, InvalidImage, UnsupportedFormat

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

    Handles palette (with transparency), RGBA/LA (composited on white), CMYK, CIELAB (TIFF), and 16/32-bit grey
    ('I;16', 'I', 'F', scaled to 8 bits rather than clipped).
    """
    mode = img.mode
    if mode == "LAB":  # Pillow has no built-in LAB -> RGB conversion; little CMS (bundled with Pillow) does it
        from PIL import ImageCms

        to_rgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        img, mode = ImageCms.applyTransform(img, to_rgb), "RGB"
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


def transform_image(img: Image.Image, spec: PreprocessSpec,
                    box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resize the shorter side to `spec.resize`, centre-crop `spec.crop`, convert to the spec's channels.

    Args:
        img: a Pillow image of any mode and size.
        spec: the preprocessing spec.
        box: the region (left, top, right, bottom, in `img`'s pixels, fractional) that holds the picture, resized
            as the whole image would be; None: all of `img`. A JPEG decoded in draft mode at 1/s scale is
            ceil(size / s) pixels, a fraction of a pixel more than the picture (`decode` passes its box).

    Returns:
        uint8 array of shape (crop, crop, channels).
    """
    img = convert_mode(img, spec.channels)
    w, h = img.size if box is None else (box[2] - box[0], box[3] - box[1])
    new_w, new_h, left, top = resize_geometry(w, h, spec)
    if box is not None or (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _PIL_INTERPOLATION[spec.interpolation], box=box)
    if (new_w, new_h) != (spec.crop, spec.crop):
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def resize_geometry(width: float, height: float, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """Where `transform_image` resizes and crops an image of this size: the one definition of that arithmetic.

    Args:
        width, height: the decoded image's size (after EXIF orientation).
        spec: the preprocessing spec (resize, crop).

    Returns:
        (new_width, new_height, left, top): the size after resizing the shorter side to `spec.resize` (unchanged when
        it already is), and the top-left corner of the centred `spec.crop` square in the resized image.
    """
    new_w, new_h = int(round(width)), int(round(height))  # a draft decode's picture box may be fractional
    if min(width, height) != spec.resize:
        scale = spec.resize / min(width, height)
        # round like torchvision's Resize(int): the shorter side is exactly `resize`
        new_w = spec.resize if width <= height else max(1, int(round(width * scale)))
        new_h = spec.resize if height <= width else max(1, int(round(height * scale)))
    left = int(round((new_w - spec.crop) / 2.0))
    top = int(round((new_h - spec.crop) / 2.0))
    return new_w, new_h, left, top


def stack_pixels(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Stack uint8 (H, W, C) images into one uint8 (N, crop, crop, channels) array: model input before normalising.

    Args:
        images: uint8 arrays of shape (crop, crop, channels) (or anything of that many pixels, e.g. (crop, crop)),
            as `transform_image` or `decode` return.
        spec: the preprocessing spec (crop, channels).

    Returns:
        C-contiguous uint8 array of shape (N, crop, crop, channels).
    """
    return np.stack([np.asarray(a, dtype=np.uint8).reshape(spec.crop, spec.crop, spec.channels) for a in images])


def normalize_pixels(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, C) pixels -> float32 (N, C, H, W) = (pixel * (1 / 255) - mean) / std, in float32.

    The torch runner's `device_preprocess` repeats exactly these float32 operations, in this order, on its device.
    """
    x = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_model_input(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Stack uint8 (H, W, C) images into normalised float32 NCHW: `normalize_pixels(stack_pixels(images))`.

    Args:
        images: uint8 arrays of shape (crop, crop, channels), as `transform_image` or `decode` return.
        spec: the preprocessing spec (mean, std).

    Returns:
        float32 array of shape (N, channels, crop, crop): (pixel / 255 - mean) / std.
    """
    return normalize_pixels(stack_pixels(images, spec), spec)


def arrays_are_model_sized(arrays: np.ndarray, spec: PreprocessSpec) -> bool:
    """True when `transform_image` is the identity on these uint8 (N, H, W[, C]) arrays (up to grey -> RGB)."""
    if arrays.dtype != np.uint8 or arrays.ndim not in (3, 4):
        return False
    channels = 1 if arrays.ndim == 3 else arrays.shape[3]
    same_size = arrays.shape[1] == arrays.shape[2] == spec.resize == spec.crop
    # RGB -> grey goes through Pillow's weighted sum, so only grey -> grey/RGB and RGB -> RGB are shortcuts
    return same_size and (channels == 1 or channels == spec.channels)


# ---------------------------------------------------------------------------------------------------------------------
# decode: bytes -> uint8 (crop, crop, C), the serving entry point (service, batch CLI, Ray actors).
# Module-level functions only, so they pickle by reference into worker processes.
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_MAX_PIXELS = 40_000_000
"""Default pixel cap of `decode` (width * height, before decoding): 40 MP, more than any phone photo."""


def _is_jpeg(head: bytes) -> bool:
    return head.startswith(b"\xff\xd8\xff")


def _is_png(head: bytes) -> bool:
    return head.startswith(b"\x89PNG\r\n\x1a\n")


def _is_webp(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _is_bmp(head: bytes) -> bool:
    return head.startswith(b"BM") and len(head) >= 26  # shorter than the smallest BMP headers (14 + 12 bytes)


def _is_gif(head: bytes) -> bool:
    return head.startswith((b"GIF87a", b"GIF89a"))


def _is_tiff(head: bytes) -> bool:
    # classic TIFF and BigTIFF, little- and big-endian
    return head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))


def _is_pnm(head: bytes) -> bool:
    # P1/P4 bitmap, P2/P5 grey map, P3/P6 pix map (plain text or binary), then whitespace; not PFM ("Pf", "PF")
    return len(head) >= 3 and head[0:1] == b"P" and head[1] in b"123456" and head[2] in b" \t\r\n"


@dataclass(frozen=True)
class ImageFormat:
    """One image format ltserve reads, everywhere: training's image folders, evaluation, `ltserve predict`, the service.

    Attributes:
        pillow: Pillow's format name; bytes sniffed as this format are parsed by this Pillow plugin only.
        title: how messages and documentation name it.
        extensions: lower-case file name endings an image folder is read with (`ltserve.data.read_image_folder`).
        sniff: True when the first 32 bytes of a file are this format's magic number.
        media_types: its Content-Type values, registered name first: what a raw-body request may declare (the
            bytes still decide the format).
    """

    pillow: str
    title: str
    extensions: tuple[str, ...]
    sniff: Callable[[bytes], bool]
    media_types: tuple[str, ...] = ()


IMAGE_FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", "JPEG", (".jpg", ".jpeg"), _is_jpeg, ("image/jpeg", "image/pjpeg")),
    ImageFormat("PNG", "PNG", (".png",), _is_png, ("image/png",)),
    ImageFormat("WEBP", "WebP", (".webp",), _is_webp, ("image/webp",)),
    ImageFormat("BMP", "BMP", (".bmp",), _is_bmp, ("image/bmp", "image/x-ms-bmp")),
    ImageFormat("GIF", "GIF", (".gif",), _is_gif, ("image/gif",)),
    ImageFormat("TIFF", "TIFF", (".tif", ".tiff"), _is_tiff, ("image/tiff",)),
    ImageFormat("PPM", "PNM", (".ppm", ".pgm", ".pbm", ".pnm"), _is_pnm,
                ("image/x-portable-anymap", "image/x-portable-pixmap", "image/x-portable-graymap",
                 "image/x-portable-bitmap")),
)
"""The one list of accepted formats: sniffed from the bytes (never from a file name or content type) by `decode`;
the extensions are how an image folder finds its files."""

SUPPORTED_FORMATS: tuple[str, ...] = tuple(f.pillow for f in IMAGE_FORMATS)
"""Pillow format names `decode` accepts."""

IMAGE_EXTENSIONS: tuple[str, ...] = tuple(ext for f in IMAGE_FORMATS for ext in f.extensions)
"""File name endings (lower case) of the accepted formats: what an image folder is read with."""

IMAGE_MEDIA_TYPES: tuple[str, ...] = tuple(m for f in IMAGE_FORMATS for m in f.media_types)
"""Content-Type values (lower case) of the accepted formats: what the service's raw-body route takes."""

FORMAT_NAMES = ", ".join(f.title for f in IMAGE_FORMATS[:-1]) + f" or {IMAGE_FORMATS[-1].title}"
"""The accepted formats in words, for messages: "JPEG, PNG, WebP, BMP, GIF, TIFF or PNM"."""

_TITLES = {f.pillow: f.title for f in IMAGE_FORMATS}

# Magic numbers of image formats we recognise but do not accept (answered 415 rather than "not an image").
_OTHER_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"qoif", "QOI"),
    (b"DDS ", "DDS"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "HDR"), (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"), (b"%!PS-Adobe", "EPS"), (b"Pf\n", "PFM"), (b"PF\n", "PFM"),
    (b"P7\n", "PAM"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
                b"avif": "AVIF", b"avis": "AVIF"}


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of `data` from its magic number, if it is one `decode` accepts.

    Args:
        data: the first bytes of a file (32 are enough).

    Returns:
        one of `SUPPORTED_FORMATS` ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM"), or None for anything else.
    """
    head = bytes(data[:32])
    return next((f.pillow for f in IMAGE_FORMATS if f.sniff(head)), None)


def _other_image_format(data: bytes) -> str | None:
    """Name of a recognised image format that `decode` does not accept (for a 415 message), else None."""
    head = bytes(data[:64])
    for magic, name in _OTHER_IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[head[8:12]]
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in bytes(data[:1024]).lower()):
        return "SVG"
    return None


def _draft_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """Smallest (w, h) with the same aspect ratio whose shorter side is still >= `resize` (for `Image.draft`)."""
    w, h = size
    short = min(w, h)
    return max(1, -(-w * resize // short)), max(1, -(-h * resize // short))


def _open_header(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Sniff the format, parse only the header with that format's plugin, and check the size: no pixel is decoded.

    Returns:
        the lazily opened Pillow image (pixels not loaded) and the sniffed format (a `SUPPORTED_FORMATS` name).
    """
    if not data:
        raise InvalidImage(f"empty file: expected the bytes of a {FORMAT_NAMES} image")
    fmt = sniff_format(data)
    if fmt is None:
        other = _other_image_format(data)
        if other is not None:
            raise UnsupportedFormat(f"{other} images are not supported; send one of {FORMAT_NAMES} "
                                    "(convert it first)")
        raise InvalidImage(f"not an image: the bytes are not {FORMAT_NAMES} (they start with {bytes(data[:8])!r})")
    title = _TITLES[fmt]
    try:
        # formats=[fmt]: only the sniffed format's plugin may parse these bytes
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:  # Pillow's own cap (2 * Image.MAX_IMAGE_PIXELS) came first
        raise ImageTooLarge(f"{title} image too large ({exc}); the limit is {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"corrupt or truncated {title} file: its header cannot be read") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise InvalidImage(f"corrupt or truncated {title} file: {exc}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidImage(f"{title} image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"{title} image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}; "
                            "send a smaller image")
    return img, fmt


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Width and height of encoded image bytes from the header alone, with every check `open_image` makes before
    decoding (format, header, pixel cap): microseconds, whatever the image's size. A server adds these up to hold a
    request to a pixel budget before it decodes anything.

    Returns:
        (width, height) in pixels.

    Raises:
        InvalidImage (400), UnsupportedFormat (415), ImageTooLarge (413): as `open_image`, but a file whose header
            is fine and whose pixel data is corrupt passes here (decoding finds it).
    """
    img, _ = _open_header(data, max_pixels)
    try:
        return img.size
    finally:
        img.close()


def jpeg_draft_applies(data: bytes, resize: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether JPEG draft decoding (`PreprocessSpec.allow_draft`) decodes these bytes differently at this resize: a
    JPEG whose shorter side is at least about twice `resize`, which libjpeg then decodes at 1/2, 1/4 or 1/8 scale.
    Every other image is decoded exactly as without draft. From the header alone (no pixel is decoded).

    Raises:
        InvalidImage (400), UnsupportedFormat (415), ImageTooLarge (413): as `image_size`.
    """
    img, fmt = _open_header(data, max_pixels)
    try:
        if fmt != "JPEG":
            return False
        size = img.size
        img.draft(None, _draft_size(size, resize))
        return img.size != size
    finally:
        img.close()


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read with every check `open_image` makes before decoding.

    Attributes:
        format: the sniffed format (a `SUPPORTED_FORMATS` name).
        width, height: the stored size, before EXIF orientation.
        mode: Pillow's mode of the decoded pixels ("RGB", "L", "CMYK", "P", ...).
        progressive: a progressive (not baseline) JPEG.
        orientation: the EXIF orientation tag (1 = upright; None: no tag).
    """

    format: str
    width: int
    height: int
    mode: str
    progressive: bool
    orientation: int | None


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of encoded image bytes (format, size, mode, progressive, EXIF orientation), no pixel decoded.

    A decoder other than Pillow's (a GPU JPEG decoder) reads this first: the same format sniffing, header parsing
    and pixel cap as `open_image`, so the same bad files get the same errors before anything is decoded.

    Raises:
        InvalidImage (400), UnsupportedFormat (415), ImageTooLarge (413): as `open_image`.
    """
    img, fmt = _open_header(data, max_pixels)
    try:
        try:
            orientation = img.getexif().get(0x0112) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else None
        except Exception:  # a broken EXIF block: Pillow's exif_transpose ignores it too when decoding
            orientation = None
        progressive = bool(img.info.get("progressive") or img.info.get("progression"))
        return ImageHeader(fmt, img.size[0], img.size[1], img.mode, progressive, orientation)
    finally:
        img.close()


class OpenedImage:
    """Encoded image bytes whose header has been read and checked (`open_header`), pixels not decoded yet: a server
    checks a request's pixel budget from `size`, then decodes with `decode_opened`, and the header is parsed once.

    Attributes:
        image: the lazily opened Pillow image.
        format: the sniffed format (a `SUPPORTED_FORMATS` name).
        size: (width, height) from the header.
        max_pixels: the cap the header was checked against.
    """

    __slots__ = ("image", "format", "size", "max_pixels")

    def __init__(self, image: Image.Image, format: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.image, self.format, self.size, self.max_pixels = image, format, image.size, max_pixels

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def open_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> OpenedImage:
    """Sniff, parse the header and check the pixel cap of encoded image bytes; no pixel is decoded (microseconds).

    Raises:
        InvalidImage (400), UnsupportedFormat (415), ImageTooLarge (413): as `image_size`.
    """
    img, fmt = _open_header(data, max_pixels)
    return OpenedImage(img, fmt, max_pixels)


def decode_opened(opened: OpenedImage, spec: PreprocessSpec) -> np.ndarray:
    """`decode` of an image whose header `open_header` has read: uint8 (crop, crop, channels).

    Raises:
        InvalidImage (400), ImageTooLarge (413): corrupt pixel data, a mode that cannot be converted.
    """
    img, box = _load(opened, spec)
    try:
        return transform_image(img, spec, box)
    except (OSError, ValueError) as exc:  # a mode Pillow cannot convert
        raise InvalidImage(f"cannot convert a {img.format or ''} image of mode {img.mode}: {exc}") from None


def open_image(data: bytes, spec: PreprocessSpec | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check and fully decode image bytes: the first frame or page, upright (EXIF orientation applied).

    The format is sniffed from the bytes and only that format's Pillow plugin may parse them (`IMAGE_FORMATS`). The
    pixel limit is checked on the header's size before any pixel is decoded. JPEG DCT-domain downscaling
    (`Image.draft`) is used only when `spec.allow_draft`, and never below `spec.resize` on the shorter side (then
    the image can hold a fraction of a pixel more than the picture at its right and bottom edges: `decode` resizes
    only the picture's box).

    Args:
        data: the encoded file.
        spec: the preprocessing spec (resize and allow_draft are used here); None: no draft (training's reader).
        max_pixels: cap on width * height.

    Returns:
        a loaded Pillow image, mode as decoded (convert with `convert_mode`).

    Raises:
        InvalidImage: empty, truncated, corrupt, or not an image (400).
        UnsupportedFormat: a recognised image format other than JPEG, PNG, WebP, BMP, GIF, TIFF, PNM (415).
        ImageTooLarge: more than `max_pixels` pixels (413).
    """
    return _open(data, spec, max_pixels)[0]


_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transposition that makes the image upright (as `ImageOps.exif_transpose`)."""


def _upright_margins(margins: tuple[float, float, float, float], orientation: int) -> tuple[float, ...]:
    """Margins (left, top, right, bottom) of a stored image, moved to the sides they take once it is upright: the
    transposition of a 2 x 2 image of corner numbers says which stored edge each upright edge was."""
    method = _EXIF_TRANSPOSE.get(orientation)
    if method is None:
        return margins
    c = np.asarray(Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8)).transpose(method))
    stored = {frozenset((0, 2)): margins[0], frozenset((0, 1)): margins[1], frozenset((1, 3)): margins[2],
              frozenset((2, 3)): margins[3]}
    edges = ((c[0, 0], c[1, 0]), (c[0, 0], c[0, 1]), (c[0, 1], c[1, 1]), (c[1, 0], c[1, 1]))
    return tuple(stored[frozenset(int(v) for v in e)] for e in edges)


def _open(data: bytes, spec: PreprocessSpec | None,
          max_pixels: int) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """`open_image`, and the box of the upright image that holds the picture after a draft decode (else None)."""
    return _load(open_header(data, max_pixels), spec)


def _load(opened: "OpenedImage",
          spec: PreprocessSpec | None) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """Decode an image whose header `open_header` read: `_open` from there on."""
    img, fmt = opened.image, opened.format
    title = _TITLES[fmt]
    margins = None
    try:
        if fmt == "JPEG" and spec is not None and spec.allow_draft:
            size = img.size
            drafted = img.draft(None, _draft_size(size, spec.resize))
            if drafted is not None and img.size != size:  # decoded at 1/s scale: ceil(size / s) pixels
                right, bottom = drafted[1][2], drafted[1][3]  # size / s, unrounded
                margins = (0.0, 0.0, img.size[0] - right, img.size[1] - bottom)
        img.load()  # decodes the first frame or page (GIF, APNG, animated WebP, multi-page TIFF)
        if fmt == "PPM" and img.mode == "I":
            img = _pnm16(img)
        if margins is not None:
            margins = _upright_margins(margins, img.getexif().get(0x0112, 1))
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{title} image too large ({exc}); the limit is {opened.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise InvalidImage(f"corrupt or truncated {title} file: {exc}") from None
    if margins is None:
        return img, None
    w, h = img.size
    return img, (margins[0], margins[1], w - margins[2], h - margins[3])


def _pnm16(img: Image.Image) -> Image.Image:
    """A PGM with maxval > 255 as mode 'I;16'.

    Pillow returns it as 32-bit mode 'I' already scaled to 0..65535 (whatever the file's maxval), and `convert_mode`
    scales mode 'I' by the image's own maximum (its range is unknown); marked 16-bit, it is scaled by 65535 like a
    16-bit PNG or TIFF, so a mid-grey stays mid-grey.
    """
    arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    return Image.fromarray(arr)  # uint16 (H, W) is mode "I;16"


def decode(data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into model-ready pixels: the serving and batch entry point.

    JPEG, PNG, WebP, BMP, GIF, TIFF and PNM (`IMAGE_FORMATS`; the first frame or page); EXIF orientation applied;
    grey, palette, RGBA, CMYK, CIELAB and 16-bit images converted by `convert_mode`; then `transform_image` (resize
    shorter side, centre crop).

    Args:
        data: the encoded file.
        spec: the model package's preprocessing spec.
        max_pixels: cap on width * height, checked from the header before decoding (decompression bombs).

    Returns:
        uint8 array of shape (spec.crop, spec.crop, spec.channels).

    Raises:
        InvalidImage (400), UnsupportedFormat (415), ImageTooLarge (413): see `open_image`.
    """
    return decode_opened(open_header(data, max_pixels), spec)
