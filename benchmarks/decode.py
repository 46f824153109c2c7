"""JPEG decoding per core, exact against draft (DCT-domain downscaling, `PreprocessSpec.allow_draft`).

    python -m benchmarks.decode [--images 300] [--sizes 32,64,112,224] [--rounds 3] [--smoke]

Corpus: the JPEG photos of `benchmarks.batch_predict.make_corpus` (seeded crops of scikit-learn's and scikit-image's
bundled photos, shorter side 256-640 px), saved at quality 90, read into memory once.

Per model input size S (3 channels; resize S + S // 7 then centre crop S, the ImageNet ratio), on ONE core (the
process pinned to one CPU; Pillow and the NumPy steps here use one thread): images/s of
`ltserve.preprocess.decode` (bytes -> uint8 crop) + `to_model_input` (normalised float32 NCHW), exact and with
draft, the same files in the same process, interleaved in --rounds rounds (median reported: the machine is shared).
Beside it: the share of files draft decodes differently (`jpeg_draft_applies`: a shorter side of at least about
2 x resize), and how different the preprocessed tensor is: mean |exact - draft| in uint8 levels over the affected
images' pixels (and its 99th percentile), and in the normalised input's units.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from benchmarks.batch_predict import make_corpus
from benchmarks.common import add_common_args, markdown_table, output_dir, write_results

NAME = "decode"
log = logging.getLogger("benchmarks.decode")


def spec_for(size: int) -> Any:
    from ltserve.preprocess import PreprocessSpec

    return PreprocessSpec(resize=size + size // 7, crop=size, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), channels=3)


@contextlib.contextmanager
def one_core() -> Iterator[int | None]:
    """Pin this process to one CPU (the last one it may use) and yield it (None where affinity is unsupported);
    the CPUs it had are given back on exit (a caller such as a test session keeps its cores)."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def time_pass(files: Sequence[bytes], spec: Any) -> float:
    """Images/s of decode + to_model_input over `files`, one image at a time."""
    from ltserve.preprocess import decode, to_model_input

    t0 = time.perf_counter()
    for data in files:
        to_model_input([decode(data, spec)], spec)
    return len(files) / (time.perf_counter() - t0)


def difference(files: Sequence[bytes], spec: Any) -> dict[str, Any]:
    """Which files draft decodes differently, and how different their preprocessed tensors are."""
    from ltserve.preprocess import decode, jpeg_draft_applies, to_model_input

    draft = spec.model_copy(update={"allow_draft": True})
    affected = [d for d in files if jpeg_draft_applies(d, spec.resize)]
    if not affected:
        return {"affected": 0, "mean_abs_levels": 0.0, "p99_abs_levels": 0.0, "mean_abs_input": 0.0}
    exact = np.stack([decode(d, spec) for d in affected]).astype(np.int16)
    drafted = np.stack([decode(d, draft) for d in affected]).astype(np.int16)
    levels = np.abs(exact - drafted)
    x_exact = to_model_input(list(exact.astype(np.uint8)), spec)
    x_draft = to_model_input(list(drafted.astype(np.uint8)), spec)
    return {"affected": len(affected), "mean_abs_levels": float(levels.mean()),
            "p99_abs_levels": float(np.percentile(levels, 99)),
            "mean_abs_input": float(np.abs(x_exact - x_draft).mean())}


def measure(files: Sequence[bytes], size: int, rounds: int) -> dict[str, Any]:
    """One input size: rounds of exact and draft passes (interleaved), medians, the difference."""
    spec = spec_for(size)
    draft = spec.model_copy(update={"allow_draft": True})
    time_pass(files[:8], spec), time_pass(files[:8], draft)  # warm the code paths
    exact_ips, draft_ips = [], []
    for r in range(rounds):
        order = ((exact_ips, spec), (draft_ips, draft)) if r % 2 == 0 else ((draft_ips, draft), (exact_ips, spec))
        for out, s in order:
            out.append(time_pass(files, s))
    exact, drafted = statistics.median(exact_ips), statistics.median(draft_ips)
    diff = difference(files, spec)
    log.info("%d px: exact %.0f img/s, draft %.0f img/s (x%.2f), %d/%d files affected, mean |diff| %.2f levels",
             size, exact, drafted, drafted / exact, diff["affected"], len(files), diff["mean_abs_levels"])
    return {"size": size, "resize": spec.resize, "images": len(files), "exact_img_s": exact, "draft_img_s": drafted,
            "speedup": drafted / exact, "exact_rounds": exact_ips, "draft_rounds": draft_ips,
            "affected_share": diff["affected"] / len(files), **diff}


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"input": f"{r['size']} px (resize {r['resize']})", "files affected": f"{r['affected_share'] * 100:.0f} %",
             "exact img/s/core": r["exact_img_s"], "draft img/s/core": r["draft_img_s"],
             "speed-up": f"x{r['speedup']:.2f}", "mean abs diff (levels)": r["mean_abs_levels"],
             "p99 abs diff (levels)": r["p99_abs_levels"], "mean abs diff (input)": r["mean_abs_input"]}
            for r in results]


def plot(results: Sequence[dict[str, Any]]) -> Callable[[Path], None]:
    """Bars: img/s per core, exact and draft, per input size."""
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(results))
        ax.bar(x - 0.2, [r["exact_img_s"] for r in results], 0.4, label="exact", color="#999")
        ax.bar(x + 0.2, [r["draft_img_s"] for r in results], 0.4, label="draft", color="#2a7")
        for i, r in enumerate(results):
            ax.text(i + 0.2, r["draft_img_s"], f"x{r['speedup']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [f"{r['size']} px" for r in results])
        ax.set_ylabel("images/s on one core (decode + preprocess)")
        ax.set_title("JPEG photos (shorter side 256-640 px, q90): exact vs draft decoding")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return draw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    add_common_args(p, NAME)
    p.add_argument("--images", type=int, default=300, help="JPEG files in the corpus (default 300)")
    p.add_argument("--sizes", default="32,64,112,224", help="model input sizes in px (default 32,64,112,224)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved exact / draft rounds (median reported)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device != "cpu":
        raise SystemExit("decode measures CPU decoding per core; --device cuda is not supported")
    n, rounds = (12, 1) if args.smoke else (args.images, args.rounds)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out = output_dir(args, NAME)
    work = Path(tempfile.mkdtemp(prefix="ltserve-decode-bench-"))
    try:
        files = [p.read_bytes() for p in make_corpus(work, n, args.seed, quality=(90, 90))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    with one_core() as cpu:
        results = [measure(files, s, rounds) for s in sizes]
    config = {"images": n, "sizes": sizes, "rounds": rounds, "seed": args.seed, "smoke": args.smoke,
              "pinned_cpu": cpu, "corpus": "seeded crops of sklearn/skimage sample photos, JPEG q90, shorter side "
              "256-640 px", "resize": "size + size // 7, centre crop size, bilinear, 3 channels"}
    columns = list(table_rows(results)[0])
    notes = (f"One core (process pinned to CPU {cpu}), one image at a time: `ltserve.preprocess.decode` + "
             f"`to_model_input`, exact vs `allow_draft`, {n} files x {rounds} interleaved rounds (median). "
             "Files affected: draft decodes them at 1/2, 1/4 or 1/8 scale (shorter side >= ~2 x resize). Differences "
             "over the affected files' preprocessed pixels (uint8 levels) and normalised input. "
             f"{time.perf_counter() - t0:.0f} s.")
    table = markdown_table(table_rows(results), columns)
    path = write_results(out, NAME, config, results, table, plot=plot(results), notes=notes)
    print(table + "\n\n" + notes)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
