"""Offline batch prediction: `ltserve predict` against a naive loop and against the Predictor's ceiling.

    python -m benchmarks.batch_predict [--images 400] [--batch-size 32] [--smoke]

Corpus: JPEG photos made from scikit-learn's sample images (china, flower) and scikit-image's bundled photos
(astronaut, coffee, chelsea, rocket, hubble_deep_field, retina, immunohistochemistry), as seeded random crops
rescaled to a shorter side of 256-640 px and saved at quality 75-95: camera-like files. The 224 px model gets the
first --images of them (default 400), the tiny model --tiny-images (default 2000: its job is short, and a few
hundred files would mostly time the worker start-up); each job reads its files from a list file.

Models (random weights; speed does not depend on them): a tiny 28 px grey CIFAR-style ResNet-8 (10 classes) and a
ResNet-18 at 224 px (1000 classes), each a synthetic run exported as a model package through
`benchmarks.model_latency.export_heads` (the product's exporter, `ltserve.export`).

What is measured, per model, in one invocation (so that the ratios share the machine's state):
- ceiling: the Predictor on pre-decoded uint8 arrays (preprocess + predict + postprocess, batches of B, threads =
  cores); decoding is done before the clock starts.
- decode only: one process reading and decoding the files (no model): what one core can feed.
- naive: one process, for each batch: read and decode B files, then preprocess + predict + postprocess.
- ltserve predict: the real CLI as a subprocess writing JSONL; images/s is the job's own figure after the model is
  loaded (files / seconds from `Predictor` ready to the last row written), and the end-to-end wall time of the
  command (interpreter start, imports, model load) is reported beside it. Run with the default workers and with
  every worker count in --workers-sweep.
The machines here are shared and their speed drifts: in each of --rounds rounds every method runs between two
ceiling passes and is reported as the median of its ratios to the mean of those two (images/s medians and spreads
in the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import add_common_args, markdown_table, output_dir, write_results

NAME = "batch_predict"
REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.batch_predict")

MODELS = {  # name: (arch, crop, channels, classes)
    "tiny-28px": ("resnet8_cifar", 28, 1, 10),
    "resnet18-224px": ("resnet18", 224, 3, 1000),
}
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


# ---------------------------------------------------------------------------------------------------------------
# Corpus and models
# ---------------------------------------------------------------------------------------------------------------


def photo_sources() -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB array) of every photo that ships with scikit-learn and scikit-image (no download)."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = [(Path(f).stem, img) for f, img in zip(sample.filenames, sample.images)]
    import skimage.data

    for name in SKIMAGE_PHOTOS:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # some need a download in newer scikit-image: use the others
            log.warning("skimage.data.%s unavailable (%s); skipped", name, exc)
            continue
        if img.ndim == 3 and img.shape[2] == 3:
            photos.append((name, img.astype(np.uint8)))
    return photos


def make_corpus(out: Path, n: int, seed: int, quality: tuple[int, int] = (75, 95)) -> list[Path]:
    """Write `n` JPEGs: seeded random crops of the photos, shorter side 256-640 px, quality 75-95 (`quality`: the
    range, inclusive).

    Returns:
        the file paths, sorted.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = photo_sources()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        name, img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(img[top:top + ch, left:left + cw])
        short = int(rng.integers(256, 641))
        scale = short / min(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))),
                           Image.Resampling.BILINEAR)
        path = out / f"{i:05d}-{name}.jpg"
        crop.save(path, quality=int(rng.integers(quality[0], quality[1] + 1)))
        files.append(path)
    return sorted(files)


def build_model(name: str, work: Path, seed: int) -> tuple[Path, str]:
    """A model package with random weights for one of MODELS; returns (package folder, how it was exported)."""
    from benchmarks.model_latency import export_heads, synthetic_run

    arch, size, channels, classes = MODELS[name]
    run = synthetic_run(work / f"run-{name}", arch, size, classes, channels=channels, seed=seed,
                        heads=("joint", "tau_norm"))
    outs, how = export_heads(run, ["tau_norm"], work, name, formats=("onnx",))
    return outs["tau_norm"], how


# ---------------------------------------------------------------------------------------------------------------
# The four measurements
# ---------------------------------------------------------------------------------------------------------------


def _decode_all(files: Sequence[Path], spec: Any) -> list[np.ndarray]:
    from ltserve.preprocess import decode

    return [decode(Path(f).read_bytes(), spec) for f in files]


class Ceiling:
    """The Predictor on pre-decoded arrays: preprocess + predict + postprocess per batch. The session is built and
    the files decoded once (untimed); each call times one pass over all images."""

    def __init__(self, model: Path, files: Sequence[Path], batch: int, threads: int) -> None:
        from ltserve.runtime import Predictor

        self.predictor = Predictor(model, threads=threads, max_batch_size=batch)
        self.images = _decode_all(files, self.predictor.spec)
        self.batch = batch

    def __call__(self) -> dict[str, Any]:
        p, images = self.predictor, self.images
        start = time.perf_counter()
        for s in range(0, len(images), self.batch):
            p.postprocess(p.predict(p.preprocess(images[s:s + self.batch])), 5)
        seconds = time.perf_counter() - start
        return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}


def measure_decode_only(files: Sequence[Path], spec: Any) -> dict[str, Any]:
    """One process reading and decoding every file (the pipeline's per-core feed rate)."""
    start = time.perf_counter()
    n = len(_decode_all(files, spec))
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def measure_naive(model: Path, files: Sequence[Path], batch: int, threads: int) -> dict[str, Any]:
    """One process: read + decode a batch, then preprocess + predict + postprocess it; no overlap."""
    from ltserve.runtime import Predictor

    p = Predictor(model, threads=threads, max_batch_size=batch)
    start = time.perf_counter()
    for s in range(0, len(files), batch):
        images = _decode_all(files[s:s + batch], p.spec)
        p.postprocess(p.predict(p.preprocess(images)), 5)
    seconds = time.perf_counter() - start
    return {"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds}


def measure_cli(model: Path, listing: Path, batch: int, workers: int | None, work: Path) -> dict[str, Any]:
    """`ltserve predict` as a real subprocess; its own post-load throughput and the command's wall time."""
    out = work / f"preds-w{workers}.jsonl"
    summary = work / f"summary-w{workers}.json"
    for p in (out, Path(f"{out}.errors.jsonl"), summary):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ltserve.cli", "predict", str(model), str(listing), "--out", str(out),
           "--batch-size", str(batch), "--no-progress", "--json", str(summary)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ltserve predict failed ({proc.returncode}): {proc.stderr[-2000:]}")
    s = json.loads(summary.read_text())
    return {"images": s["new_rows"], "seconds": s["elapsed_s"] - s["setup_s"], "images_per_s": s["images_per_s"],
            "workers": s["workers"], "setup_s": s["setup_s"], "wall_s": wall,
            "end_to_end_images_per_s": s["new_rows"] / wall}


def benchmark_model(name: str, model: Path, files: Sequence[Path], batch: int, threads: int, sweep: Sequence[int],
                    rounds: int, work: Path) -> dict[str, Any]:
    """Every measurement of one model on `files`, paired with the ceiling: in each of `rounds` rounds every method
    runs between two ceiling passes (method order rotating per round) and its ratio to their mean is kept, so that
    load from other processes on a shared machine falls on both sides of each ratio. Medians are reported."""
    from ltserve.package import load_package

    spec = load_package(model).preprocess
    listing = work / f"files-{name}.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    ceiling = Ceiling(model, files, batch, threads)
    ceiling()  # a first pass for allocations and caches, not kept
    methods: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("decode_only", lambda: measure_decode_only(files, spec)),
        ("naive", lambda: measure_naive(model, files, batch, threads)),
        ("predict:default", lambda: measure_cli(model, listing, batch, None, work)),
    ]
    from ltserve.batch.options import default_workers

    # the default run already covers the default worker count
    methods += [(f"predict:workers={w}", lambda w=w: measure_cli(model, listing, batch, w, work))
                for w in sweep if w != default_workers()]
    samples: dict[str, list[dict[str, Any]]] = {"ceiling": [], **{key: [] for key, _ in methods}}
    ratios: dict[str, list[float]] = {key: [] for key, _ in methods}
    before = ceiling()
    for r in range(rounds):
        for key, fn in methods[r % len(methods):] + methods[:r % len(methods)]:
            log.info("%s round %d/%d: %s, then the ceiling", name, r + 1, rounds, key)
            m, after = fn(), ceiling()
            samples["ceiling"].append(after)
            samples[key].append(m)
            # the reference is the mean of the ceiling passes just before and just after: drift cancels to 1st order
            ratios[key].append(m["images_per_s"] / ((before["images_per_s"] + after["images_per_s"]) / 2))
            before = after
    median = {key: float(np.median([x["images_per_s"] for x in xs])) for key, xs in samples.items()}
    vs_ceiling = {key: float(np.median(v)) for key, v in ratios.items()}
    cli_keys = [k for k in vs_ceiling if k.startswith("predict:")]
    return {
        "model": name, "package": str(model), "images": len(files), "rounds": rounds, "samples": samples,
        "median_images_per_s": median, "paired_ratios": ratios, "vs_ceiling": vs_ceiling,
        "ratios": {"predict_vs_ceiling": vs_ceiling["predict:default"],
                   "predict_vs_naive": vs_ceiling["predict:default"] / vs_ceiling["naive"],
                   "naive_vs_ceiling": vs_ceiling["naive"],
                   "best_predict_vs_ceiling": max(vs_ceiling[k] for k in cli_keys)},
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One Markdown row per (model, method): median images/s, its fraction of the ceiling, the spread."""
    names = {"ceiling": "ceiling (Predictor, pre-decoded)", "decode_only": "decode only (1 process)",
             "naive": "naive loop (decode, then infer)"}
    rows = []
    for r in results:
        for key, ips in r["median_images_per_s"].items():
            xs = [x["images_per_s"] for x in r["samples"][key]]
            method = names.get(key)
            note = f"min {min(xs):.1f}, max {max(xs):.1f}"
            if key in r["paired_ratios"]:
                q = r["paired_ratios"][key]
                note += f"; paired ratio {min(q):.2f}..{max(q):.2f}"
            if method is None:  # an ltserve predict run
                last = r["samples"][key][-1]
                method = f"ltserve predict ({key.split(':')[1]}: {last['workers']} workers)"
                e2e = np.median([x["end_to_end_images_per_s"] for x in r["samples"][key]])
                note += f"; end to end {e2e:.1f}/s incl. start-up"
            rows.append({"model": r["model"], "method": method, "images/s": ips,
                         "vs ceiling": r["vs_ceiling"].get(key, 1.0), "note": note})
    return rows


def report_md(results: Sequence[dict[str, Any]], config: dict[str, Any]) -> tuple[str, str]:
    """The results table and the notes below it (ratios, goal)."""
    table = markdown_table(table_rows(results), ["model", "method", "images/s", "vs ceiling", "note"])
    sizes = ", ".join(f"{r['model']} {r['images']}" for r in results)
    notes = [f"JPEGs (shorter side 256-640 px; {sizes} files), batch {config['batch_size']}, Predictor threads "
             f"{config['threads']}; {config['rounds']} rounds. images/s: median; vs ceiling: median of the ratios "
             "to the mean of the ceiling passes run just before and just after each measurement. ltserve predict's "
             "images/s is after model loading (end to end, with interpreter start-up and model loading, in the note).",
             ""]
    for r in results:
        q = r["ratios"]
        notes.append(f"- {r['model']}: ltserve predict = {100 * q['predict_vs_ceiling']:.0f} % of the ceiling "
                     f"(best worker count {100 * q['best_predict_vs_ceiling']:.0f} %), "
                     f"{q['predict_vs_naive']:.2f}x the naive loop; naive = {100 * q['naive_vs_ceiling']:.0f} % of "
                     "the ceiling.")
    big = next((r for r in results if r["model"].startswith("resnet18")), None)
    if big is not None:
        ok = big["ratios"]["predict_vs_ceiling"] >= 0.8
        notes.append(f"\nGoal (224 px model at >= 80 % of the ceiling): {'met' if ok else 'NOT met'} "
                     f"({100 * big['ratios']['predict_vs_ceiling']:.0f} %).")
    return table, "\n".join(notes)


def plot(results: Sequence[dict[str, Any]]) -> Callable[[Path], None]:
    """Bars: images/s of each method as a fraction of each model's ceiling."""
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        rows = table_rows(results)
        models = list(dict.fromkeys(r["model"] for r in rows))
        fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
        for ax, m in zip(axes[0], models):
            mine = [r for r in rows if r["model"] == m]
            labels = [r["method"].replace(" (", "\n(") for r in mine]
            values = [r["vs ceiling"] * 100 for r in mine]
            bars = ax.barh(range(len(mine)), values, color=["#555"] + ["#999"] * 2 + ["#2a7"] * (len(mine) - 3))
            for b, r in zip(bars, mine):
                ax.text(b.get_width() + 1, b.get_y() + b.get_height() / 2, f"{r['images/s']:.0f}/s", va="center",
                        fontsize=8)
            ax.set_yticks(range(len(mine)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.axvline(80, ls="--", color="r", lw=0.8)
            ax.set_xlabel("% of the Predictor's pre-decoded throughput")
            ax.set_title(m)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return draw


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, NAME)
    parser.add_argument("--images", type=int, default=400, help="files for the 224 px model (default 400)")
    parser.add_argument("--tiny-images", type=int, default=2000, help="files for the tiny model (default 2000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Predictor threads (ceiling, naive)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma separated: {', '.join(MODELS)}")
    parser.add_argument("--workers-sweep", default="1,2", help="also run ltserve predict with these --workers")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (--smoke: 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (corpus, packages, outputs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device != "cpu":
        raise SystemExit("batch_predict measures the CPU pipeline; --device cuda is not supported")
    models = ["tiny-28px"] if args.smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    sizes = {"tiny-28px": 24 if args.smoke else args.tiny_images, "resnet18-224px": args.images}
    rounds = 1 if args.smoke else args.rounds
    sweep = [] if args.smoke else [int(w) for w in args.workers_sweep.split(",") if w.strip()]
    out = output_dir(args, NAME)
    work = Path(tempfile.mkdtemp(prefix="ltserve-batch-bench-"))
    try:
        files = make_corpus(work / "corpus", max(sizes[m] for m in models), args.seed)
        results = []
        for name in models:
            model, how = build_model(name, work / "models", args.seed)
            r = benchmark_model(name, model, files[:sizes[name]], args.batch_size, args.threads, sweep, rounds, work)
            r["exported_with"] = how
            results.append(r)
        config = {"images": {m: sizes[m] for m in models}, "rounds": rounds, "batch_size": args.batch_size,
                  "threads": args.threads, "models": models,
                  "workers_sweep": sweep, "seed": args.seed, "smoke": args.smoke,
                  "corpus": "seeded crops of sklearn/skimage sample photos, JPEG q75-95, shorter side 256-640 px"}
        table, notes = report_md(results, config)
        path = write_results(out, NAME, config, results, table, plot=plot(results), notes=notes)
        print(table + "\n\n" + notes)
        print(f"\nresults: {path}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
