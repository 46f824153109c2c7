"""Stage 2 on cached features against `--no-cache` (augmented images through the frozen backbone every epoch).

Fits cRT twice on one run, with the same recipe (epochs, batch, lr, sampler, seed) and the same training images:
once on the cached features, once fed the official way (a backbone forward pass per step). Reports the wall time
of each fit, their ratio (one run of each), the one-off cost of building the feature cache, and the test
accuracy (Many/Medium/Few/All) of both heads. Nothing is written into the run directory.

    python -m benchmarks.stage2 runs/fashion-lt --device cuda
    python -m benchmarks.stage2 --smoke          # trains a 1-epoch tiny run in a temp folder; seconds
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_common_args, markdown_table, output_dir, write_results

NAME = "stage2"
REPO = Path(__file__).resolve().parents[1]


def _smoke_run(workdir: Path) -> Path:
    """A one-epoch configs/tiny.yaml run (the benchmark's --smoke input)."""
    from ltserve.config import load_config
    from ltserve.train import train

    run = workdir / "tiny-smoke"
    train(load_config(REPO / "configs" / "tiny.yaml", ["train.epochs=1"]), run)
    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _test_metrics(head: Any, run: Any, info: Any) -> dict[str, Any]:
    from ltserve.features.cache import cached_features
    from ltserve.metrics import classification_report

    try:
        tx, ty = cached_features(run, "test")
        split = "test"
    except Exception:  # a run without a test split: report val
        tx, ty = cached_features(run, "val")
        split = "val"
    rep = classification_report(head.logits(tx), ty, info.class_counts, info.many_threshold, info.few_threshold)
    return {"split": split, **{k: rep[k] for k in ("many", "medium", "few", "top1", "balanced_accuracy")}}


def run_benchmark(run: Path, *, epochs: int | None, device: str, seed: int, repeats: int = 3) -> dict[str, Any]:
    """Time cRT on cached features and on augmented images (median of `repeats` fits each, after a one-epoch
    warm-up of both); returns the results dict."""
    from ltserve.features.cache import cached_features
    from ltserve.rebalance import apply_rebalance_overrides, build_method
    from ltserve.rebalance.augmented import AugmentedSource
    from ltserve.rundir import open_run

    handle = open_run(run)
    info = handle.info
    cfg = apply_rebalance_overrides(handle.config, [f"rebalance.seed={seed}",
                                                    *([f"rebalance.crt.epochs={epochs}"] if epochs else [])])
    joint = handle.head("joint")

    _sync(device)
    t0 = time.perf_counter()
    fresh_x, _ = cached_features(handle, "train", use_cache=False, device=device)  # the cache's one-off cost
    _sync(device)
    extract_s = time.perf_counter() - t0
    train_x, train_y = cached_features(handle, "train")
    val = cached_features(handle, "val")

    results: dict[str, Any] = {"extract_train_features_s": extract_s, "train_images": int(len(train_y)),
                               "feature_dim": int(train_x.shape[1]), "repeats": repeats,
                               "run": {"name": cfg.name, "backbone": info.backbone.name,
                                       "train_epochs": cfg.train.epochs, "data_fingerprint": info.data_fingerprint}}
    augmented = AugmentedSource.from_run(handle, cfg, device=device)
    sources = {"cached": train_x, "no_cache": augmented}

    def fit(name: str, epochs_override: int | None = None) -> tuple[Any, float, int]:
        method = build_method("crt", cfg, handle, device=device, progress=False)
        if epochs_override is not None:
            method.settings = method.settings.model_copy(update={"epochs": epochs_override})
        _sync(device)
        t0 = time.perf_counter()
        head = method.fit(sources[name], train_y, joint, val=val)
        _sync(device)
        return head, time.perf_counter() - t0, method.settings.epochs

    for name in sources:  # warm-up: first-call costs (allocator, kernels, worker start) are not stage 2's
        fit(name, epochs_override=1)
    times: dict[str, list[float]] = {name: [] for name in sources}
    heads: dict[str, Any] = {}
    for _ in range(repeats):  # interleaved, so a busy moment of a shared machine hits both
        for name in sources:
            heads[name], seconds, n_epochs = fit(name)
            times[name].append(seconds)
    for name, head in heads.items():
        fit_s = float(np.median(times[name]))
        results[name] = {"fit_s": fit_s, "fit_s_all": times[name], "per_epoch_s": fit_s / n_epochs,
                         "best_epoch": head.meta["best_epoch"],
                         "val_score": head.meta["epochs_curve"][head.meta["best_epoch"] - 1]["score"],
                         **_test_metrics(head, handle, info)}
        logging.getLogger(NAME).info("%s: median %.2f s for %d epochs (%s)", name, fit_s, n_epochs,
                                     ", ".join(f"{t:.2f}" for t in times[name]))
    results["ratio_no_cache_over_cached"] = results["no_cache"]["fit_s"] / results["cached"]["fit_s"]
    results["recipe"] = {k: v for k, v in cfg.rebalance.crt.model_dump().items()}
    del fresh_x, augmented
    return results


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, label in (("cached", "cached features"), ("no_cache", "--no-cache (augmented, backbone per step)")):
        r = results[name]
        rows.append({"feeding": label, "fit (s)": r["fit_s"], "s/epoch": r["per_epoch_s"],
                     "best epoch": r["best_epoch"],
                     **{f"{k} %": (None if r[k] is None else 100 * r[k]) for k in ("many", "medium", "few", "top1")}})
    return rows


def _plot(results: dict[str, Any]):
    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        names = ["cached", "no_cache"]
        secs = [results[n]["fit_s"] for n in names]
        ax1.bar(["cached", "--no-cache"], secs, color=["tab:green", "tab:red"])
        ax1.set_ylabel("cRT fit wall time (s)")
        ax1.set_title(f"same recipe: {results['ratio_no_cache_over_cached']:.1f}x")
        groups = ["many", "medium", "few", "top1"]
        width = 0.38
        for k, (n, colour) in enumerate(zip(names, ["tab:green", "tab:red"])):
            vals = [np.nan if results[n][g] is None else 100 * results[n][g] for g in groups]
            ax2.bar(np.arange(4) + (k - 0.5) * width, vals, width, color=colour, label=n)
        ax2.set_xticks(np.arange(4), ["Many", "Medium", "Few", "All"])
        ax2.set_ylabel(f"{results['cached']['split']} accuracy (%)")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", help="a trained run (not needed with --smoke)")
    parser.add_argument("--epochs", type=int, default=None, help="cRT epochs (default: the run's rebalance.crt)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per feeding, interleaved; the median is reported")
    add_common_args(parser, NAME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.run_dir is None and not args.smoke:
        parser.error("give a run directory, or --smoke")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run_dir if args.run_dir is not None else _smoke_run(Path(tmp))
        epochs = args.epochs if args.epochs is not None else (1 if args.smoke else None)
        results = run_benchmark(run, epochs=epochs, device=args.device, seed=args.seed,
                                repeats=1 if args.smoke else args.repeats)
    out = output_dir(args, NAME)
    config = {"run_dir": str(args.run_dir) if args.run_dir else "tiny smoke run (configs/tiny.yaml, 1 epoch)",
              "device": args.device, "seed": args.seed, "smoke": args.smoke, "repeats": results["repeats"],
              "crt": results["recipe"]}
    table = markdown_table(_rows(results), ["feeding", "fit (s)", "s/epoch", "best epoch", "many %", "medium %",
                                            "few %", "top1 %"])
    notes = (f"Ratio (--no-cache / cached, medians of {results['repeats']} interleaved fits in this one run): "
             f"**{results['ratio_no_cache_over_cached']:.1f}x**. "
             f"Building the train feature cache once: {results['extract_train_features_s']:.2f} s "
             f"({results['train_images']} images, D={results['feature_dim']}). Both fits use the same frozen "
             "backbone (eval mode, BN frozen); --no-cache sees augmented images, the cache un-augmented ones.")
    path = write_results(out, NAME, config, results, table, plot=_plot(results), notes=notes)
    print(table)
    print(f"\n{notes}\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
