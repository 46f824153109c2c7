"""Write the small image corpus the GPU run takes along (it has no data and no network there).

    python -m benchmarks.gpu.prepare_corpus [--out benchmarks/gpu/corpus] [--n 48] [--seed 0]

Three folders of real images, seeded, about 4 MB together:
  photo_500x375/   JPEG (quality 90) 500x375 crops of real photos: the size of a typical upload
  photo_224/       JPEG (quality 90) 224x224 crops: already at the model's input size (decode cost floor)
  fashion_png/     Fashion-MNIST test images as 28x28 grey PNGs (when the data set is on this machine;
                   --fashion-n of them, 2,000 by default: ~0.7 MB)
  fashion_lsq.npz  a ridge least-squares Fashion-MNIST classifier (weights, bias, preprocess spec) fitted here on the
                   training split, for `benchmarks.gpu_preprocess_check` (many/medium/few accuracy of both paths)
and manifest.json (file, bytes, size, source). The photos are scikit-learn's china.jpg and flower.jpg and
scikit-image's astronaut, coffee, chelsea, rocket and hubble_deep_field (all shipped inside those packages);
each output is a random crop (scale 0.3-1, aspect 4:3 or 1:1) with a random horizontal flip, so no two files are
the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "corpus"
MAX_BYTES = 10 * 2**20
log = logging.getLogger("benchmarks.gpu.prepare_corpus")


def source_photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB array of every real photo shipped in scikit-learn / scikit-image that loads offline."""
    from PIL import Image

    photos: dict[str, np.ndarray] = {}
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        for name in ("china.jpg", "flower.jpg"):
            photos[f"sklearn/{name}"] = np.asarray(Image.open(folder / name).convert("RGB"))
    except Exception as exc:  # noqa: BLE001 (any import or file problem: use what else there is)
        log.warning("scikit-learn sample images unavailable: %s", exc)
    try:
        import skimage.data

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
            try:
                arr = np.asarray(getattr(skimage.data, name)())
            except Exception as exc:  # noqa: BLE001 (some need a download)
                log.warning("skimage.data.%s unavailable: %s", name, exc)
                continue
            if arr.ndim == 3 and arr.shape[2] == 3:
                photos[f"skimage/{name}"] = arr.astype(np.uint8)
    except ImportError as exc:
        log.warning("scikit-image unavailable: %s", exc)
    if not photos:
        raise RuntimeError("no source photos: install scikit-learn or scikit-image")
    return photos


def random_crop(img: np.ndarray, out_w: int, out_h: int, rng: np.random.Generator) -> "Image.Image":
    """A random crop of `img` with the output's aspect ratio, resized to (out_w, out_h), maybe flipped."""
    from PIL import Image

    h, w = img.shape[:2]
    aspect = out_w / out_h
    scale = rng.uniform(0.3, 1.0)
    ch = int(min(h, w / aspect) * np.sqrt(scale))
    cw = int(ch * aspect)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((out_w, out_h), Image.Resampling.BICUBIC)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def write_corpus(out: Path, n: int = 48, seed: int = 0, fashion_n: int = 2000) -> dict:
    """Write the corpus folders and manifest.json into `out` (replacing older files).

    Returns:
        the manifest: {"files": [{"file", "bytes", "width", "height", "source"}], "bytes": total}.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = source_photos()
    names = sorted(photos)
    files = []
    for folder, (w, h) in (("photo_500x375", (500, 375)), ("photo_224", (224, 224))):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for old in (out / folder).glob("*.jpg"):
            old.unlink()
        for i in range(n):
            name = names[i % len(names)]
            img = random_crop(photos[name], w, h, rng)
            path = out / folder / f"{i:03d}.jpg"
            img.save(path, format="JPEG", quality=90)
            files.append({"file": f"{folder}/{path.name}", "bytes": path.stat().st_size, "width": w, "height": h,
                          "source": name})
    try:
        from ltserve.data import find_fashion_mnist, read_idx

        images = read_idx(find_fashion_mnist() / "t10k-images-idx3-ubyte.gz")
        labels = read_idx(find_fashion_mnist() / "t10k-labels-idx1-ubyte.gz")
        (out / "fashion_png").mkdir(parents=True, exist_ok=True)
        for old in (out / "fashion_png").glob("*.png"):
            old.unlink()
        for i in range(fashion_n):
            path = out / "fashion_png" / f"{i:05d}_label{int(labels[i])}.png"
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            path.write_bytes(buf.getvalue())
            files.append({"file": f"fashion_png/{path.name}", "bytes": path.stat().st_size, "width": 28,
                          "height": 28, "source": f"fashion-mnist t10k[{i}]"})
        write_fashion_model(out / "fashion_lsq.npz")
    except Exception as exc:  # noqa: BLE001 (no data set here: the photos still make a corpus)
        log.warning("Fashion-MNIST unavailable, corpus without fashion_png/: %s", exc)
    total = sum(f["bytes"] for f in files)
    manifest = {"seed": seed, "n_per_folder": n, "bytes": total, "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if total > MAX_BYTES:
        raise RuntimeError(f"{out}: corpus is {total / 2**20:.1f} MB > {MAX_BYTES / 2**20:.0f} MB; lower --n")
    return manifest


def write_fashion_model(path: Path) -> None:
    """The ridge least-squares Fashion model of the tests (`tests.package_helpers.build_lsq_package`) as an .npz."""
    import tempfile

    import onnx
    from onnx import numpy_helper

    from ltserve.package import load_package
    from tests.package_helpers import build_lsq_package

    with tempfile.TemporaryDirectory() as tmp:
        pkg = build_lsq_package(Path(tmp) / "fashion-lsq")
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pkg / "model.onnx")).graph.initializer}
        spec = load_package(pkg, verify=False).preprocess
    np.savez(path, weight=weights["W"], bias=weights["b"], spec=spec.model_dump_json())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.prepare_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--n", type=int, default=48, help="images per folder")
    parser.add_argument("--fashion-n", type=int, default=2000, help="Fashion-MNIST test PNGs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    manifest = write_corpus(args.out, args.n, args.seed, args.fashion_n)
    print(f"{len(manifest['files'])} files, {manifest['bytes'] / 2**20:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
