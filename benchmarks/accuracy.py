"""Accuracy of every head, Many/Medium/Few/All, as mean and std over seeds.

    python -m benchmarks.accuracy                                  # Fashion-MNIST-LT, rho 100 and 50, 3 seeds each
    python -m benchmarks.accuracy --config configs/X.yaml --data ROOT [--seeds 0,1,2] [--epochs N]
    python -m benchmarks.accuracy --smoke                          # configs/tiny.yaml, 1 seed, 1 epoch: seconds

Default protocol (configs/fashion_lt.yaml, `--epochs` fixed for every run): Fashion-MNIST-LT at imbalance rho = 100
(n_max = 1000: 2,478 training images) and rho = 50 (n_max = 500: 1,411 images), long tail drawn per seed
(`data.split_seed`), the balanced 10,000-image test set. Each (setting, seed) runs the library end to end:
`ltserve.train.train` (stage 1, instance-balanced, `train.seed` = seed) -> `ltserve.rebalance.rebalance` (every
stage-2 head, `rebalance.seed` = seed) -> `ltserve.evaluate.evaluate_run(run, "test")`. The report gives each head's
Many / Medium / Few / All top-1 (%) as mean +- std (sample std, ddof = 1) over the seeds, and the wall time.
Budget: about 30 minutes on 2 CPU cores for the default (6 runs of ~5 minutes).

With `--data ROOT` the recipe's `data.root` is set to ROOT and the recipe's own data settings are used as they are
(one setting; `--set` overrides apply to every run).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import add_common_args, markdown_table, output_dir, write_results

NAME = "accuracy"
REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.accuracy")

GROUPS = (("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("top1", "All"))
FASHION_SETTINGS = ({"rho": 100, "n_max": 1000}, {"rho": 50, "n_max": 500})
DEFAULT_EPOCHS = 30


def run_once(config: Path, overrides: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """Train, rebalance and evaluate one run; returns {head: {many, medium, few, top1}} and timings.

    Returns:
        {"heads": {head: {"many", "medium", "few", "top1"} (fractions; None for an empty group)},
         "seconds": {"train", "rebalance", "evaluate"}, "train_images": int}.
    """
    from ltserve.config import load_config
    from ltserve.evaluate import evaluate_run
    from ltserve.rebalance import rebalance
    from ltserve.train import train

    cfg = load_config(config, list(overrides))
    t0 = time.perf_counter()
    info = train(cfg, run_dir, evaluate=False)
    t1 = time.perf_counter()
    rebalance(run_dir, progress=False)
    t2 = time.perf_counter()
    results = evaluate_run(run_dir, "test")
    t3 = time.perf_counter()
    heads = {h: {k: r.get(k) for k, _ in GROUPS} for h, r in results["heads"].items()}
    return {"heads": heads, "seconds": {"train": t1 - t0, "rebalance": t2 - t1, "evaluate": t3 - t2},
            "train_images": int(info.split_sizes.get("train", 0)), "test_images": int(results.get("n", 0))}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (ddof=1; 0 for one seed) per (setting, head) and group, in percent."""
    rows = []
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    for setting in settings:
        group_runs = [r for r in runs if r["setting"] == setting]
        heads = list(dict.fromkeys(h for r in group_runs for h in r["heads"]))
        for head in heads:
            row: dict[str, Any] = {"setting": setting, "head": head, "seeds": 0}
            for key, label in GROUPS:
                vals = [r["heads"][head][key] for r in group_runs if head in r["heads"]
                        and r["heads"][head].get(key) is not None]
                row["seeds"] = max(row["seeds"], len(vals))
                if vals:
                    a = 100.0 * np.asarray(vals, dtype=np.float64)
                    row[f"{key}_mean"] = float(a.mean())
                    row[f"{key}_std"] = float(a.std(ddof=1)) if a.size > 1 else 0.0
                    row[label] = f"{a.mean():.1f}" + (f" +- {row[f'{key}_std']:.1f}" if a.size > 1 else "")
                else:
                    row[f"{key}_mean"] = row[f"{key}_std"] = None
                    row[label] = "empty"
            rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]]):
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        settings = list(dict.fromkeys(r["setting"] for r in rows))
        fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            sub = [r for r in rows if r["setting"] == setting]
            width = 0.8 / len(GROUPS)
            x = np.arange(len(sub))
            for i, (key, label) in enumerate(GROUPS):
                means = [r[f"{key}_mean"] if r[f"{key}_mean"] is not None else 0.0 for r in sub]
                stds = [r[f"{key}_std"] or 0.0 for r in sub]
                ax.bar(x + (i - 1.5) * width, means, width, yerr=stds, capsize=2, label=label)
            ax.set_xticks(x, [r["head"] for r in sub], rotation=30, ha="right")
            ax.set_ylabel("top-1 (%)")
            ax.set_ylim(0, 100)
            ax.set_title(setting)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, NAME)
    parser.add_argument("--config", type=Path, default=None,
                        help="recipe (default configs/fashion_lt.yaml; --smoke: configs/tiny.yaml)")
    parser.add_argument("--data", default=None, help="data root for the recipe (sets data.root; one setting)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --smoke: 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"stage-1 epochs of every run (default {DEFAULT_EPOCHS} for Fashion-MNIST-LT, the "
                             "recipe's with --data; --smoke: 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override applied to every run (repeatable)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run directories (default: tmp, "
                        "deleted after each run)")
    return parser


def plan(args: argparse.Namespace) -> tuple[Path, list[tuple[str, list[str]]], list[int]]:
    """(recipe, [(setting name, overrides)], seeds) for this invocation."""
    if args.smoke:
        config = args.config or REPO / "configs" / "tiny.yaml"
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
        epochs = args.epochs or 1
    else:
        config = args.config or REPO / "configs" / "fashion_lt.yaml"
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0, 1, 2]
        epochs = args.epochs or (None if args.data else DEFAULT_EPOCHS)
    common = list(args.overrides) + ([f"train.epochs={epochs}"] if epochs else [])
    if args.data:
        settings = [(f"{Path(config).stem} on {args.data}", [f"data.root={args.data}"])]
    elif args.smoke:
        settings = [("tiny (Fashion-MNIST-LT rho 100, n_max 200)", [])]
    else:
        settings = [(f"Fashion-MNIST-LT rho {s['rho']}, n_max {s['n_max']}",
                     [f"data.longtail.rho={s['rho']}", f"data.longtail.n_max={s['n_max']}"])
                    for s in FASHION_SETTINGS]
    return Path(config), [(name, ov + common) for name, ov in settings], seeds


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    out = output_dir(args, NAME)
    config, settings, seeds = plan(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="ltserve-accuracy-"))
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    jobs = [(name, ov, seed) for name, ov in settings for seed in seeds]
    for name, overrides, seed in tqdm(jobs, desc="accuracy runs", unit="run"):
        run_dir = work / f"{len(runs):02d}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        seeded = overrides + [f"train.seed={seed}", f"data.split_seed={seed}", f"rebalance.seed={seed}"]
        result = run_once(config, seeded, run_dir)
        runs.append({"setting": name, "seed": seed, "overrides": seeded, **result})
        if args.work is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    total = time.perf_counter() - started
    rows = aggregate(runs)
    cols = ["setting", "head", "Many", "Medium", "Few", "All", "seeds"]
    epochs = next((o.split("=", 1)[1] for o in settings[0][1] if o.startswith("train.epochs=")), "the recipe's")
    notes = (f"Top-1 (%) on the test split, mean +- std (ddof 1) over seeds {seeds}; recipe {config.name}, "
             f"{epochs} stage-1 epochs per run; {len(runs)} runs in {total / 60:.1f} min "
             f"({total / max(len(runs), 1):.0f} s per run: train + rebalance every head + evaluate). "
             "Empty shot groups are reported as 'empty', not 0.")
    config_out = {"config": str(config), "settings": {n: ov for n, ov in settings}, "seeds": seeds,
                  "smoke": args.smoke, "data": args.data, "budget": "about 30 min on 2 CPU cores (default)",
                  "wall_seconds": total}
    write_results(out, NAME, config_out, {"rows": rows, "runs": runs}, markdown_table(rows, cols), plot(rows),
                  notes)
    print(f"{NAME}: {len(runs)} runs in {total:.0f} s; results in {out}")
    print(markdown_table(rows, cols))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
