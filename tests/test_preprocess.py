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


# (Pillow format, mode written, save options): uncompressed and compressed TIFF, and the three PNM kinds
TIFF_PNM = {
    "tiff": ("TIFF", "RGB", {}),
    "tiff_deflate": ("TIFF", "RGB", {"compression": "tiff_deflate"}),
    "tiff_lzw_grey": ("TIFF", "L", {"compression": "tiff_lzw"}),
    "tiff_packbits": ("TIFF", "RGB", {"compression": "packbits"}),
    "tiff_rgba": ("TIFF", "RGBA", {}),
    "ppm": ("PPM", "RGB", {}),
    "pgm": ("PPM", "L", {}),
    "pbm": ("PPM", "1", {}),
}


@pytest.mark.parametrize("case", list(TIFF_PNM))
@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_tiff_and_pnm_decode_to_the_same_pixels_as_png(photo, case, spec):
    fmt, mode, kw = TIFF_PNM[case]
    src = photo.convert(mode)
    if mode == "RGBA":
        src.putalpha(Image.linear_gradient("L").resize(src.size))
    data = encode(src, fmt, **kw)
    assert sniff_format(data) == fmt
    if fmt == "PPM":
        assert data[:2] == {"RGB": b"P6", "L": b"P5", "1": b"P4"}[mode]
    out = decode(data, spec)
    assert out.shape == (spec.crop, spec.crop, spec.channels)
    assert np.array_equal(out, decode(encode(src, "PNG"), spec))


def test_plain_text_pnm_decodes():
    grey = np.array([[0, 64], [128, 255]], np.uint8)
    spec = PreprocessSpec(resize=2, crop=2, mean=(0.5,), std=(0.5,), channels=1)
    assert np.array_equal(decode(b"P2\n# a comment\n2 2\n255\n0 64\n128 255\n", spec)[..., 0], grey)
    assert np.array_equal(decode(b"P1\n2 2\n0 1\n1 0\n", spec)[..., 0], [[255, 0], [0, 255]])  # 1 is black
    rgb = decode(b"P3 2 1 255 255 0 0 0 0 255", PreprocessSpec(resize=1, crop=1, mean=(0.5,) * 3, std=(0.5,) * 3,
                                                              channels=3))
    assert rgb.shape == (1, 1, 3)


def test_multipage_tiff_uses_the_first_page():
    pages = [Image.new("L", (30, 30), v) for v in (10, 200, 90)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:], compression="tiff_deflate")
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    assert (decode(buf.getvalue(), GREY) == 10).all()


def _pgm16(arr: np.ndarray, maxval: int) -> bytes:
    """A binary 16-bit PGM (big-endian samples, as the format says) with the given maxval."""
    return f"P5\n{arr.shape[1]} {arr.shape[0]}\n{maxval}\n".encode() + arr.astype(">u2").tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "TIFF-big-endian", "PGM", "PGM-maxval-1000"])
def test_sixteen_bit_grey_tiff_and_pgm_scale_like_png(fmt):
    arr = np.full((28, 28), 32896, np.uint16)  # 32896 / 65535 * 255 = 128.0
    arr[:, 14:] = 65535
    if fmt == "PGM":
        data = _pgm16(arr, 65535)
    elif fmt == "PGM-maxval-1000":  # 502 / 1000 * 255 = 128.01
        data = _pgm16(np.where(arr == 65535, 1000, 502), 1000)
    elif fmt == "TIFF-big-endian":
        img = Image.new("I;16B", (28, 28))
        img.frombytes(arr.astype(">u2").tobytes())
        data = encode(img, "TIFF")
        assert data.startswith(b"MM") and Image.open(io.BytesIO(data)).mode == "I;16B"
    else:
        data = encode(Image.fromarray(arr), fmt)
    out = decode(data, GREY)[..., 0]
    # the image's own maximum is 255: scaled by the format's range (65535 or maxval), not by that maximum
    assert (out[:, :10] == 128).all() and (out[:, 18:] == 255).all(), fmt


def test_uniform_sixteen_bit_pgm_keeps_its_grey():
    # no pixel at the maximum: scaling by the image's own maximum would make this mid-grey image white
    for maxval, value in ((65535, 32896), (4095, 2056)):  # 2056 / 4095 * 255 = 128.03
        assert (decode(_pgm16(np.full((28, 28), value), maxval), GREY) == 128).all(), maxval


def test_lab_tiff_converts_to_rgb():
    from PIL import ImageCms

    rgb = Image.new("RGB", (30, 30), (200, 100, 50))
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    data = encode(ImageCms.applyTransform(rgb, to_lab), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    spec = PreprocessSpec(resize=30, crop=30, mean=(0.5,) * 3, std=(0.5,) * 3, channels=3)
    assert np.abs(decode(data, spec).astype(int) - [200, 100, 50]).max() <= 2


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


def _tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian TIFF whose first IFD claims width x height 8-bit grey pixels but holds 64 bytes of them."""
    n_tags = 9
    data_offset = 8 + 2 + 12 * n_tags + 4
    # (tag, type, count, value): SHORT (3) and LONG (4) values sit in the entry itself, little-endian
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, data_offset), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 64)]
    ifd = struct.pack("<H", n_tags) + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x80" * 64


@pytest.mark.parametrize("size", [(100_000, 100_000), (5000, 4000)])
def test_tiff_pixel_limit_is_checked_before_decoding(size):
    with pytest.raises(ImageTooLarge, match="TIFF") as err:
        decode(_tiff_claiming(*size), GREY, max_pixels=10_000_000)
    assert err.value.status_code == 413
    # the same file with a small size claim: decoding starts and finds the strip short (so the cap came first)
    with pytest.raises(InvalidImage) as err2:
        decode(_tiff_claiming(50, 40), GREY)
    assert not isinstance(err2.value, ImageTooLarge)
    assert decode(_tiff_claiming(8, 8), GREY).min() == 0x80  # and the forged header itself is a valid TIFF


def test_pixel_limit_for_real_images(photo):
    data = encode(photo, "JPEG")
    with pytest.raises(ImageTooLarge, match="160x120"):
        decode(data, RGB, max_pixels=160 * 120 - 1)
    assert decode(data, RGB, max_pixels=160 * 120).shape == (32, 32, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM"])
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
    pfm = encode(photo.convert("F"), "PPM")  # Pillow writes mode F as PFM (floats): recognised, not accepted
    assert pfm.startswith(b"Pf")
    for data in (encode(photo, "ICO"), pfm, b"8BPS" + b"\0" * 60):
        with pytest.raises(UnsupportedFormat, match="not supported") as err:
            decode(data, RGB)
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


@pytest.mark.parametrize("orientation", [1, 2, 5, 6, 8])
def test_jpeg_draft_resizes_only_the_picture_whatever_the_exif_orientation(photo, orientation):
    """A draft decode at 1/8 of 1203 x 901 is 151 x 113 pixels for a 150.375 x 112.625 picture: resizing all of it
    shifts the content (about 1.5 levels from the exact decode here); the picture's box, moved with the EXIF
    rotation or flip to the side it ends up on, keeps draft within about 0.3 level."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    photo.resize((1203, 901), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=92, exif=exif)
    spec = PreprocessSpec(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3, channels=3)
    exact = decode(buf.getvalue(), spec).astype(int)
    drafted = decode(buf.getvalue(), spec.model_copy(update={"allow_draft": True})).astype(int)
    assert 0 < np.abs(drafted - exact).mean() < 0.8


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
