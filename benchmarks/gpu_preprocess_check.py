"""Device-side preprocessing against the CPU path: same answers? (issue 12, the GPU session's check).

    python -m benchmarks.gpu_preprocess_check --corpus benchmarks/gpu/corpus --photo-model DIR [--device cuda]

Two paths over the same files, the model on `--device` both times (the torch backend, fp16 on CUDA):
  cpu path     today's: Pillow decodes, resizes and crops (`ltserve.preprocess.decode`), NumPy normalises, float32
               NCHW is copied to the device (`TorchRunner.run`)
  device path  `DeviceDecoder`: baseline JPEGs decoded by `torchvision.io.decode_jpeg(device=...)` (nvJPEG on CUDA),
               resized and cropped there; every other file by the CPU decoder; then the uint8 pixels are normalised
               on the device inside the CUDA graph (`TorchRunner(device_preprocess=True).run_pixels`)
Data: the corpus's real photos (photo_500x375/, photo_224/; `--photo-model`, e.g. gpu_run.sh's ResNet-50 package)
and its Fashion-MNIST test PNGs (fashion_png/, labels in the names) on the ridge least-squares Fashion model whose
weights the corpus carries (fashion_lsq.npz, written by `benchmarks.gpu.prepare_corpus`), with long-tailed class
counts, so many/medium/few accuracy can be compared. Goals (issue 12): top-1 agreement >= 99.5 % on both, and
many/medium/few accuracy equal within 0.3 point. With `--device cpu` the device path runs torchvision's CPU JPEG
decoder: it checks the script and the resize/crop arithmetic on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_common_args, markdown_table, output_dir, write_results

NAME = "gpu_preprocess_check"
AGREEMENT_GOAL = 0.995
SHOT_GOAL_POINTS = 0.3
log = logging.getLogger("benchmarks.gpu_preprocess_check")


def compare(model_dir: Path, files: list[Path], device: str, batch: int) -> dict[str, Any]:
    """Both paths over `files`: logits, pixel differences, which decoder took each file, time per path."""
    from ltserve.preprocess import decode, normalize_pixels, stack_pixels
    from ltserve.runtime.device_decode import DeviceDecoder
    from ltserve.runtime.torch_runner import TorchRunner

    runner = TorchRunner(model_dir, device=device, max_batch_size=batch, device_preprocess=True)
    spec = runner.meta.preprocess
    decoder = DeviceDecoder(spec, device=device)
    verified = decoder.verify()  # the start-up check a server would run; its images are not counted below
    decoder.counts = {"device": 0, "cpu": 0}
    data = [f.read_bytes() for f in files]
    runner.warmup()
    runner.run(normalize_pixels(np.zeros((batch, spec.crop, spec.crop, spec.channels), np.uint8), spec))
    cpu_logits, dev_logits, cpu_px, dev_px, seconds = [], [], [], [], {"cpu": 0.0, "device": 0.0}
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        t0 = time.perf_counter()
        px = stack_pixels([decode(d, spec) for d in chunk], spec)
        cpu_logits.append(runner.run(normalize_pixels(px, spec)))
        t1 = time.perf_counter()
        pixels = decoder.decode(chunk)
        dev_logits.append(runner.run_pixels(pixels))
        t2 = time.perf_counter()
        seconds["cpu"] += t1 - t0
        seconds["device"] += t2 - t1
        cpu_px.append(px)
        dev_px.append(pixels.cpu().numpy())
    a, b = np.concatenate(cpu_logits), np.concatenate(dev_logits)
    pdiff = np.abs(np.concatenate(cpu_px).astype(np.int16) - np.concatenate(dev_px).astype(np.int16))
    return {"cpu_logits": a, "device_logits": b, "meta": runner.meta, "precision": runner.precision,
            "verify_max_pixel_diff": verified["max_pixel_diff"],
            "decoded_on_device": decoder.counts["device"], "decoded_on_cpu": decoder.counts["cpu"],
            "pixel_diff_mean": float(pdiff.mean()), "pixel_diff_max": int(pdiff.max()),
            "pixel_diff_p99": float(np.percentile(pdiff, 99)),
            "max_abs_logit_diff": float(np.abs(a - b).max()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "img_per_s_cpu_path": len(data) / max(seconds["cpu"], 1e-9),
            "img_per_s_device_path": len(data) / max(seconds["device"], 1e-9)}


def input_speed(model_dir: Path, device: str, batch: int, iters: int) -> list[dict[str, Any]]:
    """Model calls per second, host to host, with float32 NCHW input (normalised on the host, 4 bytes a pixel
    copied) and with uint8 NHWC pixels (normalised in the CUDA graph, 1 byte a pixel copied): what decides
    whether `device_preprocess` becomes the default. Host normalisation is timed too: it is part of that path."""
    from ltserve.preprocess import normalize_pixels
    from ltserve.runtime.torch_runner import TorchRunner

    runner = TorchRunner(model_dir, device=device, max_batch_size=batch, device_preprocess=True)
    spec = runner.meta.preprocess
    pixels = np.random.default_rng(0).integers(0, 256, (batch, spec.crop, spec.crop, spec.channels), dtype=np.uint8)
    paths = {"float32 NCHW, host-normalised": lambda: runner.run(normalize_pixels(pixels, spec)),
             "uint8 NHWC, device-normalised": lambda: runner.run_pixels(pixels)}
    rows = []
    for name, call in paths.items():
        for _ in range(3):
            call()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        ms = (time.perf_counter() - t0) / iters * 1000.0
        rows.append({"input": name, "batch": batch, "precision": runner.precision, "ms_per_call": ms,
                     "img_per_s": batch / ms * 1000.0})
    return rows


def shot_accuracy(logits: np.ndarray, labels: np.ndarray, meta: Any) -> dict[str, float | None]:
    """Overall and many/medium/few top-1 accuracy, in percent."""
    from ltserve.metrics import group_accuracy, per_class_accuracy

    pred = logits.argmax(1)
    groups = group_accuracy(per_class_accuracy(pred, labels, len(meta.labels)), meta.shot_groups)
    return {"overall": 100.0 * float((pred == labels).mean()),
            **{k: None if v is None else 100.0 * v for k, v in groups.items()}}


def fashion_package(corpus: Path, out: Path) -> Path | None:
    """The Fashion model from the corpus's fashion_lsq.npz, as a package with model.pt2 made by this torch."""
    npz = corpus / "fashion_lsq.npz"
    if not npz.is_file():
        return None
    from ltserve.preprocess import PreprocessSpec
    from tests.package_helpers import FASHION_LABELS, LT_COUNTS, write_gemm_package

    z = np.load(npz)
    spec = PreprocessSpec.model_validate_json(str(z["spec"]))
    return write_gemm_package(out, z["weight"], z["bias"], spec, FASHION_LABELS, LT_COUNTS, name="fashion-lsq",
                              pt2=True)


def row(name: str, r: dict[str, Any], n: int) -> dict[str, Any]:
    keep = ("verify_max_pixel_diff", "decoded_on_device", "decoded_on_cpu", "pixel_diff_mean", "pixel_diff_p99",
            "pixel_diff_max", "max_abs_logit_diff", "top1_agreement", "img_per_s_cpu_path", "img_per_s_device_path",
            "precision")
    return {"data": name, "images": n, **{k: r[k] for k in keep}}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]],
                                           list[dict[str, Any]]]:
    rows, shots, goals, speed = [], [], [], []
    photos = sorted((args.corpus / "photo_500x375").glob("*.jpg")) + sorted((args.corpus / "photo_224").glob("*.jpg"))
    if args.photo_model and photos:
        r = compare(args.photo_model, photos[:args.limit], args.device, args.batch)
        rows.append(row("photos", r, len(photos[:args.limit])))
        speed = input_speed(args.photo_model, args.device, args.speed_batch, 5 if args.smoke else 30)
    pngs = sorted((args.corpus / "fashion_png").glob("*_label*.png"))[:args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        pkg = fashion_package(args.corpus, Path(tmp) / "fashion-lsq") if pngs else None
        if pkg is not None:
            labels = np.array([int(re.search(r"_label(\d+)", p.name).group(1)) for p in pngs])
            r = compare(pkg, pngs, args.device, args.batch)
            rows.append(row("fashion_png", r, len(pngs)))
            cpu, dev = shot_accuracy(r["cpu_logits"], labels, r["meta"]), shot_accuracy(r["device_logits"], labels,
                                                                                        r["meta"])
            for k in cpu:
                delta = None if cpu[k] is None else abs(cpu[k] - dev[k])
                shots.append({"group": k, "cpu_path": cpu[k], "device_path": dev[k], "abs_diff_points": delta})
    for r in rows:
        goals.append({"goal": f"{r['data']}: top-1 agreement device vs cpu path", "target": f">= {AGREEMENT_GOAL:.1%}",
                      "measured": f"{r['top1_agreement']:.2%}", "met": r["top1_agreement"] >= AGREEMENT_GOAL})
    worst = max((s["abs_diff_points"] for s in shots if s["abs_diff_points"] is not None), default=None)
    if worst is not None:
        goals.append({"goal": "fashion_png: overall/many/medium/few accuracy, device vs cpu path",
                      "target": f"<= {SHOT_GOAL_POINTS} point", "measured": f"{worst:.2f} point",
                      "met": worst <= SHOT_GOAL_POINTS})
    return rows, shots, goals, speed


def plot(rows: list[dict[str, Any]], shots: list[dict[str, Any]], path: Path) -> None:
    """Left: top-1 agreement per data set against the goal; right: accuracy per shot group, both paths."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar([r["data"] for r in rows], [100 * r["top1_agreement"] for r in rows], color="tab:blue")
    left.axhline(100 * AGREEMENT_GOAL, color="tab:red", ls="--", label="goal")
    left.set(ylabel="top-1 agreement, %", ylim=(95, 100.5), title="device path vs cpu path")
    left.legend()
    shown = [s for s in shots if s["cpu_path"] is not None]
    x = np.arange(len(shown))
    right.bar(x - 0.2, [s["cpu_path"] for s in shown], 0.4, label="cpu path")
    right.bar(x + 0.2, [s["device_path"] for s in shown], 0.4, label="device path")
    right.set(xticks=x, xticklabels=[s["group"] for s in shown], ylabel="accuracy, %", title="fashion_png")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_preprocess_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, NAME)
    parser.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parent / "gpu" / "corpus")
    parser.add_argument("--photo-model", type=Path, help="a package with model.pt2 and a 3-channel spec")
    parser.add_argument("--batch", type=int, default=64, help="files per decode and model call")
    parser.add_argument("--limit", type=int, default=None, help="at most this many files per data set")
    parser.add_argument("--speed-batch", type=int, default=256, help="batch of the input-copy timing (photo model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.limit, args.speed_batch = args.limit or 16, min(args.speed_batch, 8)
    out = output_dir(args, NAME)
    rows, shots, goals, speed = run(args)
    if not rows:
        log.error("nothing compared: no photos with --photo-model and no fashion_png/ + fashion_lsq.npz in %s",
                  args.corpus)
        return 1
    shown_goals = [{**g, "met": "yes" if g["met"] else "**no**"} for g in goals]
    body = "\n\n".join([markdown_table(shown_goals, ["goal", "target", "measured", "met"]),
                        markdown_table(rows, list(rows[0]), floatfmt="{:.4g}"),
                        markdown_table(shots, ["group", "cpu_path", "device_path", "abs_diff_points"])
                        if shots else "",
                        markdown_table(speed, ["input", "batch", "precision", "ms_per_call", "img_per_s"])
                        if speed else ""])
    config = {"corpus": str(args.corpus), "photo_model": str(args.photo_model), "device": args.device,
              "batch": args.batch, "limit": args.limit, "speed_batch": args.speed_batch}
    decoder = "nvJPEG" if args.device == "cuda" else f"torchvision's {args.device} JPEG decoder (no GPU here)"
    notes = (f"Device path: {decoder} for baseline JPEGs, resize and crop on {args.device}, normalisation inside the "
             "model call; cpu path: Pillow + NumPy. Photo model: " + (args.photo_model.name if args.photo_model
                                                                          else "-") + ".")
    write_results(out, NAME, config, {"goals": goals, "rows": rows, "shot_accuracy": shots, "input_speed": speed},
                  body,
                  plot=lambda path: plot(rows, shots, path), notes=notes)
    log.info("results in %s\n%s", out, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
