"""Which nodes int8 export keeps in float, measured: speed on ResNet-50, accuracy per shot group on the embedded
default.

    python -m benchmarks.int8_placement                       # both parts (~15 min on 2 CPU cores)
    python -m benchmarks.int8_placement --part speed          # ResNet-50 224 px latency only (needs a quiet machine)
    python -m benchmarks.int8_placement --part accuracy --seeds 0,1,2 --heads la,crt,tau_norm,ncm
    python -m benchmarks.int8_placement --smoke               # seconds: checks the script

Variants: every quantisable node int8, or the head Gemm, the first convolution (the stem), or both kept in float
(`ltserve.export.quantize.quantize_int8` with those nodes excluded, everything else as `--precision int8` does it:
QDQ, per-channel int8 weights, uint8 activations, MinMax, float logits); accuracy also with 8-bit weights against
the default 7-bit ones (`reduce_range`; the kernels, so the speed, are the same).

- speed: a synthetic ResNet-50 (seeded random weights, 1000 classes, `benchmarks.model_latency.synthetic_run`) is
  exported fp32 by `ltserve.export.export_package`, quantised per variant (one calibration, 64 training images, for
  all), and every graph runs through the product's `OnnxRunner` at each batch size, interleaved in rounds
  (`benchmarks.model_latency.measure`); reported: p50 and the speed-up over fp32.
- accuracy: per seed, the embedded default as shipped (configs/fashion_lt.yaml) is trained and re-balanced, each
  head exported fp32, quantised per variant (256 class-balanced training images), and both graphs are compared on
  the whole test split (10,000 images): the change of Many / Medium / Few / All in points.
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

NAME = "int8_placement"
REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.int8_placement")

VARIANTS: dict[str, tuple[str, ...]] = {"all int8": (), "head float": ("head",), "stem float": ("stem",),
                                        "head+stem float": ("head", "stem")}
GROUPS = (("many", "Many"), ("medium", "Medium"), ("few", "Few"), ("top1", "All"))


def quantise_variants(fp32: Path, out: Path, calib: np.ndarray, bits: Sequence[int]) -> dict[tuple[str, int], Path]:
    """{(variant, weight bits): int8 graph} of one fp32 graph, all from one calibration (a shared range cache)."""
    import onnx

    from ltserve.export.quantize import quantize_int8, resolve_float_nodes

    model = onnx.load(str(fp32))
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "ranges.json"
    graphs = {}
    for variant, keep in VARIANTS.items():
        for b in bits:
            dst = out / f"{variant.replace(' ', '_').replace('+', '_')}-{b}bit" / "model.onnx"
            dst.parent.mkdir(exist_ok=True)
            quantize_int8(fp32, dst, calib, list(resolve_float_nodes(model, keep)), reduce_range=b == 7, cache=cache)
            graphs[(variant, b)] = dst
    return graphs


# ---------------------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------------------


def speed(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """p50 latency of fp32 and every variant (7-bit weights) through OnnxRunner, interleaved; one row per
    (variant, batch) with the speed-up over fp32 measured in the same rounds."""
    from benchmarks.model_latency import Cell, export_heads, measure, synthetic_run
    from ltserve.export.quantize import calibration_images
    from ltserve.package import load_package
    from ltserve.rundir import open_run
    from ltserve.runtime.onnx_runner import OnnxRunner

    arch, size, classes = ("resnet10", 32, 10) if args.smoke else (args.arch, 224, 1000)
    name = f"{arch}-{size}px-{classes}c"
    run_dir = work / "runs" / name
    if not (run_dir / "run.json").is_file():
        synthetic_run(run_dir, arch, size, classes, seed=args.seed, heads=("joint",))
    pkgs, _ = export_heads(run_dir, ("joint",), work / "models", name, formats=("onnx",), verify_images=16)
    meta = load_package(pkgs["joint"])
    calib = calibration_images(open_run(run_dir), 16 if args.smoke else 64, args.seed).x
    graphs = {"fp32": pkgs["joint"] / "model.onnx",
              **{v: p for (v, _), p in quantise_variants(pkgs["joint"] / "model.onnx", work / "speed", calib,
                                                          (7,)).items()}}
    cells = []
    for variant, path in graphs.items():
        runner = OnnxRunner(path.parent, meta, providers=["cpu"], threads=args.threads, max_batch_size=4096)
        cells.append(Cell(name, "joint", variant, runner.run, runner=runner))
    rows = []
    rng = np.random.default_rng(args.seed)
    for batch in [int(b) for b in args.batches.split(",")]:
        x = rng.standard_normal((batch, meta.preprocess.channels, size, size), dtype=np.float32)
        measure(cells, x, 0.2 if args.smoke else args.seconds, 2 if args.smoke else 5, 2000,
                warmup=1 if args.smoke else 3)
        base = float(np.median(cells[0].samples))
        for c in cells:
            p50 = float(np.median(c.samples))
            rows.append({"model": name, "variant": c.backend, "batch": batch, "p50_ms": p50,
                         "p90_ms": float(np.percentile(c.samples, 90)), "iters": len(c.samples),
                         "speedup_vs_fp32": base / p50})
        log.info("batch %d: %s", batch, ", ".join(f"{r['variant']} {r['p50_ms']:.1f} ms" for r in rows[-len(cells):]))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------------------


def accuracy(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Per seed and head: every (variant, weight bits) against the fp32 graph on the whole test split."""
    from benchmarks.accuracy import run_once
    from ltserve.export import export_package
    from ltserve.export.quantize import calibration_images
    from ltserve.export.reference import verification_images
    from ltserve.export.verify import group_accuracy
    from ltserve.rundir import open_run

    config = REPO / "configs" / ("tiny.yaml" if args.smoke else "fashion_lt.yaml")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = work / f"run-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"train.seed={seed}", f"data.split_seed={seed}", f"rebalance.seed={seed}",
                     *(["train.epochs=1"] if args.smoke else [])]
        run_once(config, overrides, run_dir)
        run = open_run(run_dir)
        x, labels, _, _ = verification_images(run.config.data.model_dump_json(),
                                              run.config.preprocess.model_dump_json(), 10_000)
        calib = calibration_images(run, 256, seed).x
        for head in args.heads.split(","):
            pkg = run_dir / "models" / head
            export_package(run, head, pkg, verify_images=64, progress=False)
            ref = _logits(pkg / "model.onnx", x)
            acc32 = group_accuracy(ref, labels, run.info)
            for (variant, bits), path in quantise_variants(pkg / "model.onnx", run_dir / "int8" / head, calib,
                                                           (7, 8)).items():
                got = _logits(path, x)
                acc = group_accuracy(got, labels, run.info)
                rows.append({"seed": seed, "head": head, "variant": variant, "weight_bits": bits,
                             "agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
                             **{f"d{label}": _points(acc32[k], acc[k]) for k, label in GROUPS}})
            log.info("seed %d %s: done", seed, head)
        if args.work is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def _points(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else 100.0 * (after - before)


def _logits(path: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def summarise(acc_rows: list[dict[str, Any]], speed_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, weight bits): the mean and worst change of Few and All over heads and seeds, and the
    speed-up over fp32 at each batch size measured (7-bit rows; the kernels do not depend on the bits)."""
    out = []
    keys = list(dict.fromkeys((r["variant"], r["weight_bits"]) for r in acc_rows)) or [(v, 7) for v in VARIANTS]
    for variant, bits in keys:
        sub = [r for r in acc_rows if (r["variant"], r["weight_bits"]) == (variant, bits)]
        row: dict[str, Any] = {"variant": variant, "weight_bits": bits, "cases": len(sub)}
        for label in ("Few", "All"):
            vals = [r[f"d{label}"] for r in sub if r[f"d{label}"] is not None]
            row[f"mean d{label}"] = float(np.mean(vals)) if vals else None
            row[f"worst d{label}"] = float(np.min(vals)) if vals else None
        row["mean agreement"] = float(np.mean([r["agreement"] for r in sub])) if sub else None
        for r in speed_rows:
            if r["variant"] == variant:  # measured with 7-bit weights; 8-bit runs the same kernels
                row[f"speed-up b{r['batch']}"] = r["speedup_vs_fp32"]
        out.append(row)
    return out


def earlier_part(out: Path, part: str) -> dict[str, Any]:
    """With `--part speed` or `--part accuracy`, the other part's rows from a results.json already in `out` (the
    two parts want different machine states: speed a quiet machine, accuracy only time), with when and under
    which load they were measured; {} when there are none or both parts run now."""
    import json

    other = {"speed": "accuracy", "accuracy": "speed"}.get(part)
    path = out / "results.json"
    if other is None or not path.is_file():
        return {}
    data = json.loads(path.read_text())
    rows = (data.get("results") or {}).get(other) or []
    if data.get("benchmark") != NAME or not rows:
        return {}
    env = data.get("environment", {})
    return {"part": other, other: rows, "date": env.get("date"), "load": env.get("load_average"),
            "environment": env}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, NAME)
    parser.add_argument("--part", choices=["both", "speed", "accuracy"], default="both")
    parser.add_argument("--arch", default="resnet50", help="speed: the backbone (default resnet50, 224 px)")
    parser.add_argument("--batches", default="1,8", help="speed: batch sizes (default 1,8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="speed: measured seconds per graph and batch")
    parser.add_argument("--threads", type=int, default=None, help="speed: intra-op threads (default: all cores)")
    parser.add_argument("--seeds", default="0,1,2", help="accuracy: seeds of the embedded default (default 0,1,2)")
    parser.add_argument("--heads", default="la,crt,tau_norm,ncm", help="accuracy: heads (default la,crt,tau_norm,ncm)")
    parser.add_argument("--work", type=Path, default=None, help="folder for runs and packages (default: tmp)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("ltserve", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.smoke:
        args.seeds, args.heads, args.batches = str(args.seed), "la", "1,2"
    out = output_dir(args, NAME)
    work = args.work or Path(tempfile.mkdtemp(prefix="ltserve-int8-placement-"))
    started = time.perf_counter()
    speed_rows = speed(args, work) if args.part in ("both", "speed") else []
    acc_rows = accuracy(args, work) if args.part in ("both", "accuracy") else []
    earlier = earlier_part(out, args.part)
    speed_rows = speed_rows or earlier.get("speed", [])
    acc_rows = acc_rows or earlier.get("accuracy", [])
    summary = summarise(acc_rows, speed_rows)
    from ltserve.export.quantize import DEFAULT_KEEP_FLOAT

    parts = ["## Summary (changes in points, int8 - fp32; speed-up = fp32 p50 / int8 p50)",
             markdown_table(summary, list(dict.fromkeys(k for r in summary for k in r)))]
    if speed_rows:
        parts += ["## Speed", markdown_table(speed_rows, ["model", "variant", "batch", "p50_ms", "p90_ms", "iters",
                                                          "speedup_vs_fp32"])]
    if acc_rows:
        parts += ["## Accuracy per seed and head", markdown_table(
            acc_rows, ["seed", "head", "variant", "weight_bits", "dMany", "dMedium", "dFew", "dAll", "agreement"],
            floatfmt="{:+.2f}")]
    kept = ", ".join(DEFAULT_KEEP_FLOAT) or "none"
    notes = (f"Default of `ltserve export --precision int8` when this ran: keep {kept} in float, 7-bit weights. "
             f"Speed: {args.arch} 224 px, random weights, ONNX Runtime CPU through OnnxRunner, {args.seconds:g} s "
             f"per graph and batch in interleaved rounds. Accuracy: configs/fashion_lt.yaml as shipped, seeds "
             f"{args.seeds}, heads {args.heads}, whole test split. {time.perf_counter() - started:.0f} s.")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if earlier:
        notes += (f" The {earlier['part']} rows come from the earlier run in this folder ({earlier['date']}, load "
                  f"average {earlier['load']}); this run measured the {args.part} part.")
    write_results(out, NAME, config, {"summary": summary, "speed": speed_rows, "accuracy": acc_rows,
                                      "default_keep_float": list(DEFAULT_KEEP_FLOAT),
                                      **({"earlier_part": {k: v for k, v in earlier.items()
                                                           if k in ("part", "date", "load", "environment")}}
                                         if earlier else {})},
                  "\n\n".join(parts), _plot(summary), notes)
    print("\n\n".join(parts))
    print(f"{NAME}: results in {out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _plot(summary: list[dict[str, Any]]):
    """Speed-up over fp32 at the largest batch against the few-shot change: mean (dot) and worst case (cross)."""
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for i, r in enumerate(summary):
            keys = sorted((k for k in r if k.startswith("speed-up b")), key=lambda k: int(k.removeprefix("speed-up b")))
            if not keys or r["mean dFew"] is None:
                continue
            x = r[keys[-1]] + (0.01 if r["weight_bits"] == 8 else -0.01)  # 7- and 8-bit share kernels: side by side
            color = f"C{i // 2}"
            ax.plot([x, x], [r["worst dFew"], r["mean dFew"]], color=color, linewidth=0.8)
            ax.scatter([x], [r["mean dFew"]], color=color, marker="o" if r["weight_bits"] == 7 else "s",
                       label=f"{r['variant']} ({r['weight_bits']}-bit)")
            ax.scatter([x], [r["worst dFew"]], color=color, marker="x")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.axhline(-1.0, color="C3", linestyle="--", linewidth=0.8)
        ax.set_xlabel("speed-up over fp32 at the largest batch")
        ax.set_ylabel("few-shot change (points): mean o/s, worst x")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw


if __name__ == "__main__":
    raise SystemExit(main())
