"""`ltserve.runtime.device_decode`: which files go to the device JPEG decoder, the CPU fallback, the same errors, and
the device path's resize/crop against Pillow's, measured here with torchvision's CPU JPEG decoder (`device="cpu"`).
On a GPU, `benchmarks/gpu_preprocess_check.py` measures the nvJPEG path the same way.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ltserve.errors import ImageTooLarge, InvalidImage, UnsupportedFormat
from ltserve.preprocess import PreprocessSpec, decode, read_header

RGB_SPEC = PreprocessSpec(resize=73, crop=64, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), channels=3)
GREY_SPEC = PreprocessSpec(resize=32, crop=28, interpolation="bilinear", mean=(0.5,), std=(0.5,), channels=1)


def encode(arr: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Real photos (scikit-learn, scikit-image; on a machine without them, such as the GPU machine, the JPEGs of
    benchmarks/gpu/corpus), 3 seeded crops each of 0.3-1 of the side, RGB uint8."""
    from benchmarks.gpu.prepare_corpus import DEFAULT_OUT, source_photos

    try:
        sources = list(source_photos().values())
    except (ImportError, RuntimeError):
        sources = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(DEFAULT_OUT.glob("photo_*/*.jpg"))[:8]]
    if not sources:
        pytest.skip("no real photos: scikit-learn / scikit-image, or benchmarks/gpu/corpus, needed")
    rng = np.random.default_rng(1)
    out = []
    for photo in sources:
        photo = photo if photo.ndim == 3 else np.repeat(photo[..., None], 3, axis=2)
        h, w = photo.shape[:2]
        for _ in range(3):
            ch, cw = int(h * rng.uniform(0.3, 1)), int(w * rng.uniform(0.3, 1))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            out.append(np.ascontiguousarray(photo[y:y + ch, x:x + cw, :3]))
    return out


@pytest.fixture(scope="module")
def decoder():
    from ltserve.runtime.device_decode import DeviceDecoder

    return DeviceDecoder(RGB_SPEC, device="cpu")


def test_only_baseline_upright_rgb_or_grey_jpegs_go_to_the_device():
    from ltserve.runtime.device_decode import device_decodable

    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rotated = Image.fromarray(img).getexif()
    rotated[0x0112] = 6
    cases = {
        "baseline": (encode(img), True), "grey": (encode(img[..., 0]), True),
        "progressive": (encode(img, progressive=True), False),
        "cmyk": (encode(Image.fromarray(img).convert("CMYK")), False),
        "exif-rotated": (encode(img, exif=rotated), False),
        "png": (encode(img, "PNG"), False), "webp": (encode(img, "WEBP"), False), "bmp": (encode(img, "BMP"), False),
        "gif": (encode(img[..., 0], "GIF"), False),
    }
    for name, (data, want) in cases.items():
        assert device_decodable(read_header(data), RGB_SPEC) is want, name
    lanczos = RGB_SPEC.model_copy(update={"interpolation": "lanczos"})
    assert not device_decodable(read_header(cases["baseline"][0]), lanczos)


def test_the_cpu_fallback_gives_the_cpu_paths_pixels(decoder):
    img = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    files = [encode(img, "PNG"), encode(img, progressive=True), encode(img, "WEBP", lossless=True),
             encode(Image.fromarray(img).convert("CMYK")), encode(img)]
    before = dict(decoder.counts)
    out = decoder.decode(files)
    assert out.dtype.is_floating_point is False and tuple(out.shape) == (5, 64, 64, 3)
    for data, got in zip(files[:4], out[:4].numpy()):
        assert np.array_equal(got, decode(data, RGB_SPEC))
    assert decoder.counts["cpu"] - before["cpu"] == 4 and decoder.counts["device"] - before["device"] == 1


def test_bad_files_get_the_cpu_paths_errors_before_any_decoding(decoder):
    img = np.zeros((40, 50, 3), np.uint8)
    good, jpeg = encode(img), encode(np.zeros((300, 400, 3), np.uint8))
    cases = [b"", b"hello world, not an image", b"\x00\x00\x01\x00" + bytes(60), jpeg[:20], jpeg]
    for data in cases:
        with pytest.raises((InvalidImage, UnsupportedFormat, ImageTooLarge)) as want:
            decode(data, RGB_SPEC, max_pixels=100_000)
        with pytest.raises(type(want.value)) as got:
            decoder.__class__(RGB_SPEC, device="cpu", max_pixels=100_000).decode([good, data])
        assert str(got.value) == str(want.value)


def test_a_jpeg_the_device_refuses_goes_to_the_cpu_decoder(decoder):
    """Header fine, data cut: torchvision refuses it, Pillow's answer (here its 400) is the one given."""
    data = encode(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    with pytest.raises(InvalidImage) as want:
        decode(data[:len(data) // 2], RGB_SPEC)
    with pytest.raises(InvalidImage) as got:
        decoder.decode([encode(np.zeros((40, 50, 3), np.uint8)), data[:len(data) // 2]])
    assert str(got.value) == str(want.value)


def test_grey_is_pillows_luma_exactly():
    """No resize (the photo is already 28x28): the device's RGB -> L is Pillow's to the bit."""
    from ltserve.runtime.device_decode import DeviceDecoder

    spec = GREY_SPEC.model_copy(update={"resize": 28})
    rng = np.random.default_rng(0)
    files = [encode(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), quality=95) for _ in range(8)]
    got = DeviceDecoder(spec, device="cpu").decode(files).numpy()
    want = np.stack([decode(d, spec) for d in files])
    assert np.array_equal(got, want)


def test_device_resize_and_crop_match_pillow_on_real_photos(photos, decoder):
    """torchvision's decoder + antialiased interpolate + resize_geometry's crop vs Pillow: the same pixels give the
    same top-1 under a random linear model; pixel differences are rounding-sized."""
    files = [encode(p, quality=90) for p in photos]
    got = decoder.decode(files).numpy().astype(np.int16)
    want = np.stack([decode(d, RGB_SPEC) for d in files]).astype(np.int16)
    diff = np.abs(got - want)
    assert len(files) >= 18 and diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 3, (diff.mean(), diff.max())
    w = np.random.default_rng(0).normal(size=(got[0].size, 10))
    agree = ((got.reshape(len(got), -1) @ w).argmax(1) == (want.reshape(len(want), -1) @ w).argmax(1)).mean()
    assert agree >= 0.95


def test_importing_device_decode_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ltserve.runtime.device_decode; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("spec", [RGB_SPEC, GREY_SPEC, RGB_SPEC.model_copy(update={"interpolation": "bicubic"})])
def test_verify_compares_the_decoder_with_the_cpu_path(spec):
    from ltserve.runtime.device_decode import DeviceDecoder

    decoder = DeviceDecoder(spec, device="cpu")
    report = decoder.verify()
    assert report["passed"] and report["images"] == 4 and decoder.counts["device"] == 4
    assert report["max_pixel_diff"] <= 2 and report["mean_pixel_diff"] < 0.5, report


@pytest.mark.gpu
def test_nvjpeg_path_agrees_with_the_cpu_path(photos):
    """On CUDA: nvJPEG + resize/crop on the GPU vs Pillow on the real photos (what gpu_preprocess_check measures)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ltserve.runtime.device_decode import DeviceDecoder

    decoder = DeviceDecoder(RGB_SPEC, device="cuda")
    assert decoder.verify()["passed"]
    files = [encode(p, quality=90) for p in photos]
    got = decoder.decode(files)
    assert got.is_cuda and decoder.counts["device"] >= len(files)
    diff = np.abs(got.cpu().numpy().astype(np.int16) - np.stack([decode(d, RGB_SPEC) for d in files]).astype(np.int16))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6, (diff.mean(), diff.max())
