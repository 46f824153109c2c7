"""decode(): every accepted format and mode, EXIF orientation, the pixel limit before decoding, bad files."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ltserve.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from ltserve.preprocess import PreprocessSpec, decode, sniff_format, transform_image

GREY = PreprocessSpec(resize=28, crop=28, mean=(0.286,), std=(0.353,), channels=1)
RGB = PreprocessSpec(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channels=3)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photo (scikit-learn's china.jpg), downsized to keep the test fast."""
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0]).resize((160, 120), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_every_format_decodes_like_pillow(photo, fmt, spec):
    src = photo.convert("P") if fmt == "GIF" else photo
    data = encode(src, fmt)
    assert sniff_format(data) == fmt
    out = decode(data, spec)
    assert out.dtype == np.uint8 and out.shape == (spec.crop, spec.crop, spec.channels)
    # the same pixels Pillow gives when it opens the file itself, through the shared transform
    assert np.array_equal(out, transform_image(Image.open(io.BytesIO(data)), spec))
    # and close to the original photo (lossy formats differ a little, GIF quantises colours)
    ref = transform_image(photo, spec).astype(int)
    assert np.abs(out.astype(int) - ref).mean() < (25 if fmt == "GIF" else 6)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("L", (30, 30), v) for v in (10, 200, 90)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    out = decode(buf.getvalue(), GREY)
    assert np.all(np.abs(out.astype(int) - 10) <= 1)


def test_grey_palette_rgba_la_bilevel_modes():
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, 15:, 3] = 255  # left half transparent -> composited on white
    out = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), PreprocessSpec(resize=30, crop=30, mean=(0.5,) * 3,
                                                                             std=(0.5,) * 3, channels=3))
    assert out[:, :10].min() == 255  # white where transparent
    assert (out[:, 20:, 0] == 255).all() and (out[:, 20:, 1] == 0).all()  # red where opaque

    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    assert decode(encode(pal, "PNG"), GREY).min() == 255

    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    pal_t.paste(0, (0, 0, 30, 30))  # every pixel index 0 = transparent black -> white
    assert decode(encode(pal_t, "PNG", transparency=0), GREY).min() == 255

    la = Image.fromarray(np.stack([np.full((30, 30), 0, np.uint8), np.full((30, 30), 0, np.uint8)], -1), "LA")
    assert decode(encode(la, "PNG"), GREY).min() == 255  # fully transparent black -> white

    bilevel = Image.new("1", (30, 30), 1)
    assert decode(encode(bilevel, "PNG"), GREY).min() == 255
    assert decode(encode(Image.new("L", (30, 30), 77), "PNG"), GREY).max() == 77


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = np.full((28, 28), 32896, np.uint16)  # 32896 / 65535 * 255 = 128.0
    arr[:, 14:] = 65535
    img = Image.fromarray(arr)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode(data, GREY)[..., 0]
    assert (out[:, :10] == 128).all() and (out[:, 18:] == 255).all()


def test_cmyk_jpeg_converts_to_rgb(photo):
    data = encode(photo.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data, RGB).astype(int)
    ref = transform_image(photo, RGB).astype(int)
    assert np.abs(out - ref).mean() < 8  # the colours survive the CMYK round trip (not inverted)


def test_exif_orientation_is_applied():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255  # landscape, left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends on top
    spec = PreprocessSpec(resize=40, crop=40, mean=(0.5,), std=(0.5,), channels=1)
    for fmt in ("JPEG", "PNG", "WEBP"):
        out = decode(encode(img, fmt, exif=exif.tobytes()), spec)[..., 0].astype(int)
        assert out[:15].mean() > 240 and out[-15:].mean() < 15, fmt
    plain = decode(encode(img, "PNG"), spec)[..., 0].astype(int)  # no EXIF: left/right, not top/bottom
    assert plain[:, :15].mean() > 240 and plain[:, -15:].mean() < 15


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes (it cannot decode)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(100_000, 100_000), (5000, 4000)])
def test_pixel_limit_is_checked_before_decoding(size):
    data = _png_claiming(*size)
    with pytest.raises(ImageTooLarge) as err:
        decode(data, GREY, max_pixels=10_000_000)
    assert err.value.status_code == 413
    # the pixel data is garbage: had decoding started, this would be InvalidImage (truncated), not ImageTooLarge
    with pytest.raises(InvalidImage) as err2:
        decode(_png_claiming(50, 40), GREY)
    assert not isinstance(err2.value, ImageTooLarge)


def test_pixel_limit_for_real_images(photo):
    data = encode(photo, "JPEG")
    with pytest.raises(ImageTooLarge, match="160x120"):
        decode(data, RGB, max_pixels=160 * 120 - 1)
    assert decode(data, RGB, max_pixels=160 * 120).shape == (32, 32, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_truncated_files_raise_invalid_image(photo, fmt):
    src = photo.convert("P") if fmt == "GIF" else photo
    data = encode(src, fmt)
    for cut in (len(data) // 2, 40, 12):
        with pytest.raises(InvalidImage) as err:
            decode(data[:cut], RGB)
        assert err.value.status_code == 400, (fmt, cut)


@pytest.mark.parametrize("data", [b"", b"hello, this is a text file\n", bytes(range(256)) * 8,
                                  np.random.default_rng(0).bytes(5000), b"\xff\xd8\xff" + b"\0" * 100])
def test_not_images_raise_invalid_image(data):
    with pytest.raises(InvalidImage) as err:
        decode(data, GREY)
    assert err.value.status_code == 400 and not isinstance(err.value, UnsupportedFormat)


def test_other_image_formats_are_unsupported(photo):
    for fmt in ("TIFF", "ICO", "PPM"):
        with pytest.raises(UnsupportedFormat, match="not supported") as err:
            decode(encode(photo, fmt), RGB)
        assert err.value.status_code == 415
    with pytest.raises(UnsupportedFormat, match="SVG"):
        decode(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', RGB)


def test_jpeg_draft_only_when_allowed(photo):
    big = photo.resize((1600, 1200), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=92)
    spec = PreprocessSpec(resize=64, crop=56, mean=(0.5,) * 3, std=(0.5,) * 3, channels=3)
    exact = decode(data, spec)
    assert np.array_equal(exact, transform_image(Image.open(io.BytesIO(data)), spec))  # no draft by default
    drafted = decode(data, spec.model_copy(update={"allow_draft": True}))
    assert drafted.shape == exact.shape
    diff = np.abs(drafted.astype(int) - exact.astype(int))
    assert 0 < diff.mean() < 4  # a DCT-domain downscale happened, and it is a small numerical change


def test_decode_of_png_equals_transform_of_array():
    """The in-memory path of package evaluation (PIL -> transform_image) is exactly what decode does to a PNG."""
    arr = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for a in arr:
        img = Image.fromarray(a)
        assert np.array_equal(decode(encode(img, "PNG"), GREY), transform_image(img, GREY))


def test_decode_is_picklable_for_worker_processes():
    assert pickle.loads(pickle.dumps(decode)) is decode
    import concurrent.futures as cf
    import multiprocessing as mp

    data = encode(Image.new("L", (28, 28), 50), "PNG")
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        out = pool.submit(decode, data, GREY).result(timeout=60)
    assert out.shape == (28, 28, 1) and int(out.max()) == 50
