"""Live label shift: how well the prior of a stream is estimated from the model's own outputs, and what adapting
to it buys, for every head of the default model; and what the estimator costs per request.

    python -m benchmarks.label_shift                    # trains the default recipe (~2 min on 2 cores), ~5 min in all
    python -m benchmarks.label_shift --run runs/NAME    # reuse a trained run (every stage-2 head is fitted if missing)
    python -m benchmarks.label_shift --smoke            # the committed package only, 1 seed, short streams: seconds

Models: the committed package `models/fashion-lt` (its exported head, through the Predictor: the serving path; its
model.json records `label_shift`, the val confusion matrix BBSE inverts and the class-wise bias EM's source prior is
corrected by when export found one), and every stage-2 head of a run of the default recipe (configs/fashion_lt.yaml as shipped, seed 0), whose logits are the head's own on the cached
test features (what export verifies its package against) and whose `label_shift` is computed as export computes it
(val confusion matrix, class-wise bias).

Streams: the balanced 10,000-image Fashion-MNIST test set drawn with known priors, 2,000 images each (exact class
counts, shuffled, no image twice): uniform; the training prior (rho 100); the reversed training prior; the rarest
training class at 50 % (the rest uniform); and a switch, 2,000 images of the training prior then 2,000 of the
reversed one. Each of `--seeds` draws.

Per stream, model and method (em; bbse where the confusion matrix exists), as the service runs it: one image per
request, `LiveEstimator` with the service's defaults (window 2,000, re-estimate every 200 images, floor 200,
smoothing 1 image per class, dead band 0.05, cap 3 nats). Reported: the total-variation error of the estimate
against the stream's prior after 200 ... 2,000 images; accuracy unadapted, adapted online (each image with the
shift known before it, the service's apply), adapted transductively (one estimate over the whole stream, `ltserve
predict --adapt-prior`), and with the true prior (the ceiling: logits + log(pi_true / pi_src)); for the switch, the
error against the new prior after the switch. Cost: the estimator's CPU time per one-image request (report: observe;
apply: observe + adapt), amortised over the re-estimates, against the p50 of one request in process on the demo
model (PNG bytes -> decode -> preprocess -> ONNX Runtime -> postprocess). The goals, the first table and the plot
show the committed package with the estimator the default setting (`LTSERVE_PRIOR_METHOD=auto`) resolves to for it
(`resolve_method`); the other tables show both estimators for every model and which one auto picks.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import add_common_args, markdown_table, output_dir, percentiles, write_results

NAME = "label_shift"
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "fashion-lt"
STREAM = 2000
CHECKPOINTS = (200, 400, 600, 800, 1000, 1400, 2000)
SHIFTED = ("train", "reversed", "one_class_50", "switch")
log = logging.getLogger("benchmarks.label_shift")


@dataclass
class Model:
    """One head's logits on the whole test set and the priors its package records."""

    name: str
    logits: np.ndarray  # (10000, C) float32
    package: Any  # ltserve.runtime.prior.PackagePrior
    source: str  # where the logits come from

    @property
    def auto(self) -> tuple[str, str]:
        """(the estimator the default method, auto, picks for this model's package, why)."""
        from ltserve.runtime.prior import AUTO, resolve_method

        return resolve_method(AUTO, self.package)


def scenarios(counts: Sequence[int], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """name -> {"priors": [pi, ...] (one per segment), "about": text}."""
    c = len(counts)
    train = np.asarray(counts, dtype=np.float64) / np.sum(counts)
    rare = int(np.argmin(counts))
    one = np.full(c, 0.5 / (c - 1))
    one[rare] = 0.5
    return {
        "uniform": {"priors": [np.full(c, 1.0 / c)], "about": "uniform"},
        "train": {"priors": [train], "about": "the training prior, rho 100"},
        "reversed": {"priors": [train[::-1].copy()], "about": "the training prior reversed"},
        "one_class_50": {"priors": [one], "about": f"{labels[rare]} (the rarest training class) at 50 %"},
        "switch": {"priors": [train, train[::-1].copy()], "about": "training prior, then reversed halfway"},
    }


def draw(labels: np.ndarray, pi: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n test indices with class counts floor/ceil(n * pi) summing to n, no index twice, shuffled."""
    counts = np.floor(pi * n).astype(int)
    counts[np.argsort(-(pi * n - counts), kind="stable")[:n - counts.sum()]] += 1
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == j), k, replace=False) for j, k in enumerate(counts)])
    rng.shuffle(idx)
    return idx


# ---------------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------------


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test images (N, 28, 28) uint8 and labels (N,)."""
    from ltserve.data import find_fashion_mnist, read_idx

    folder = find_fashion_mnist()
    return (read_idx(folder / "t10k-images-idx3-ubyte.gz"),
            read_idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64))


def demo_model(images: np.ndarray) -> tuple[Model, Any]:
    """The committed package through the Predictor (and the Predictor, for the cost measurement)."""
    from ltserve.runtime import Predictor
    from ltserve.runtime.prior import PackagePrior

    predictor = Predictor(DEMO, max_batch_size=256)
    logits = predictor.predict(predictor.preprocess(list(images[..., None])))
    name = f"models/fashion-lt ({predictor.meta.head.name})"
    return Model(name, logits, PackagePrior.from_meta(predictor.meta), "package, Predictor"), predictor


def run_models(run_dir: Path | None, work: Path) -> tuple[list[Model], dict[str, Any]]:
    """Every stage-2 head of a default-recipe run (trained into `work` unless `run_dir` is given)."""
    from ltserve.config import load_config
    from ltserve.export import head_params, label_shift_info
    from ltserve.features.cache import cached_features
    from ltserve.heads import HEADS
    from ltserve.rebalance import rebalance
    from ltserve.rundir import open_run
    from ltserve.runtime.prior import PackagePrior

    info: dict[str, Any] = {}
    if run_dir is None:
        from ltserve.train import train

        run_dir = work / "default"
        t0 = time.perf_counter()
        train(load_config(REPO / "configs" / "fashion_lt.yaml"), run_dir, evaluate=False)
        info["train_s"] = time.perf_counter() - t0
    run = open_run(run_dir)
    missing = [h for h in HEADS.names() if not (run.paths.heads / f"{h}.json").is_file()]
    if missing:
        t0 = time.perf_counter()
        rebalance(run_dir, missing, progress=False)
        info["rebalance_s"] = time.perf_counter() - t0
        run = open_run(run_dir)
    x, _ = cached_features(run, "test", progress=False)
    models = []
    for name in HEADS.names():
        head = run.head(name)
        shift = label_shift_info(run, head)
        pkg = PackagePrior.from_parts(head_params(head)["target_prior"], head.temperature, shift,
                                      head.num_classes)
        models.append(Model(f"run {name}", head.logits(x).astype(np.float32), pkg, "run head, cached features"))
        info.setdefault("bias_test", {})[name] = (
            None if shift is None else {k: v for k, v in shift.bias_test.items() if k != "fitted"})
    info["run"] = str(run_dir)
    info["epochs"] = run.info.epochs_done
    return models, info


# ---------------------------------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------------------------------


def simulate(model: Model, method: str, priors: list[np.ndarray], idx: np.ndarray, labels: np.ndarray,
             segment: int, window: int) -> dict[str, Any]:
    """One stream through a LiveEstimator, one image per request; accuracies and the estimate every 200 images (when
    the estimator re-estimates)."""
    from ltserve.runtime.prior import (EstimatorSettings, LiveEstimator, adapt_logits, estimate_prior, prior_shift,
                                       tv_distance)

    pkg = model.package
    live = LiveEstimator(pkg, EstimatorSettings(method=method, window=window))
    logits, y = model.logits[idx], labels[idx]
    online = np.empty(len(idx), dtype=np.int64)
    curve: dict[int, float] = {}
    for k in range(len(idx)):
        row = logits[k:k + 1]
        shift = live.shift  # what the service would add to this request: the estimate before it
        online[k] = int((row if shift is None else row + shift).argmax())
        live.observe(row, t=float(k))
        if (k + 1) % 200 == 0:
            curve[k + 1] = tv_distance(live.estimate.prior, priors[min(k // segment, len(priors) - 1)])
    truth = np.concatenate([np.tile(np.log(p / pkg.source), (min(segment, len(idx) - s * segment), 1))
                            for s, p in enumerate(priors)]).astype(np.float32)
    trans = estimate_prior(logits, pkg, method)
    trans_shift = prior_shift(trans.prior, pkg.source) if trans.estimated else None
    mix = np.bincount(y, minlength=pkg.num_classes) / len(y)
    return {"tv": curve, "acc_unadapted": float(np.mean(logits.argmax(1) == y)),
            "acc_online": float(np.mean(online == y)),
            "acc_transductive": float(np.mean(adapt_logits(logits, trans_shift).argmax(1) == y)),
            "acc_ceiling": float(np.mean((logits + truth).argmax(1) == y)),
            "tv_transductive": tv_distance(trans.prior, mix), "final_estimate": live.estimate.prior.tolist()}


def run_streams(models: list[Model], labels: np.ndarray, scen: dict[str, dict[str, Any]], seeds: Sequence[int],
                stream: int, window: int) -> list[dict[str, Any]]:
    """Every (model, method, scenario, seed): `simulate`'s result with its keys."""
    out = []
    for model in models:
        methods = ["em"] + (["bbse"] if model.package.confusion is not None else [])
        for sname, s in scen.items():
            for seed in seeds:
                rng = np.random.default_rng(1000 * seed + len(sname))
                idx = np.concatenate([draw(labels, p, stream, rng) for p in s["priors"]])
                for method in methods:
                    r = simulate(model, method, s["priors"], idx, labels, stream, window)
                    out.append({"model": model.name, "method": method, "scenario": sname, "seed": seed, **r})
    return out


def aggregate(streams: list[dict[str, Any]], stream: int) -> list[dict[str, Any]]:
    """Mean over seeds per (model, method, scenario): TV at each checkpoint, accuracies (%), switch metrics."""
    rows = []
    keys = list(dict.fromkeys((r["model"], r["method"], r["scenario"]) for r in streams))
    for model, method, sname in keys:
        sub = [r for r in streams if (r["model"], r["method"], r["scenario"]) == (model, method, sname)]
        row: dict[str, Any] = {"model": model, "method": method, "scenario": sname, "seeds": len(sub)}
        steps = sorted(sub[0]["tv"])
        row["tv"] = {n: float(np.mean([r["tv"][n] for r in sub])) for n in steps}
        row["tv_max_seed"] = {n: float(np.max([r["tv"][n] for r in sub])) for n in steps}
        for k in ("acc_unadapted", "acc_online", "acc_transductive", "acc_ceiling"):
            row[k] = 100.0 * float(np.mean([r[k] for r in sub]))
        row["tv_transductive"] = float(np.mean([r["tv_transductive"] for r in sub]))
        if sname == "switch":
            after = [n for n in steps if n > stream]
            traj = np.array([row["tv"][n] for n in after])
            row["switch"] = {"after": [n - stream for n in after], "tv_new": traj.tolist(),
                             "rebound": float(np.max(traj - np.minimum.accumulate(traj))) if traj.size else None}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------------------------------


def cost(predictor: Any, model: Model, images: np.ndarray, requests: int, p50_iters: int) -> dict[str, Any]:
    """p50 of one request in process, and what the service's live prior adds to each one-image request.

    The added cost is measured on the service's own step after predict: `LivePrior.adapt` then postprocess (lock,
    observe, the shift with apply, the answers as LivePredictions; the re-estimates, which run in the prior's
    background thread, count too: process CPU time) minus the plain `Predictor.postprocess` on the same logits, CPU
    time per request, in report and apply mode. Its state is written by the same thread every 5 s.
    """
    from PIL import Image

    from ltserve.runtime.prior import EstimatorSettings
    from ltserve.serve.live_prior import LivePrediction, LivePrior

    pngs = []
    for im in images[:200]:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    for data in pngs[:20]:  # warm
        predictor.postprocess(predictor.predict(predictor.preprocess([predictor.decode(data)])))
    lat = []
    for i in range(p50_iters):
        t0 = time.perf_counter()
        predictor.postprocess(predictor.predict(predictor.preprocess([predictor.decode(pngs[i % len(pngs)])])))
        lat.append((time.perf_counter() - t0) * 1000.0)
    rows = model.logits[np.random.default_rng(0).integers(0, len(model.logits), requests)]

    def per_request(post: Any) -> float:
        t0 = time.process_time()
        for k in range(requests):
            post(rows[k:k + 1])
        return (time.process_time() - t0) / requests * 1e6

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ltserve-label-shift-state-") as state:
        plain = min(per_request(predictor.postprocess) for _ in range(2))
        for mode in ("report", "apply"):
            prior = LivePrior(predictor.meta, EstimatorSettings(), mode, Path(state) / mode, "1")

            def answer(logits: np.ndarray, prior: Any = prior) -> Any:  # the service's step after predict
                shifted, adapted = prior.adapt(logits)
                return predictor.postprocess(shifted, 5, LivePrediction, adapted=adapted)

            answer(rows[:500])  # past the floor: the shift exists, as in steady state
            out[f"{mode}_us"] = max(0.0, min(per_request(answer) for _ in range(2)) - plain)
            prior.close()
        live = LivePrior(predictor.meta, EstimatorSettings(), "report", Path(state) / "timing", "1")
        live.adapt(rows[:2000])
        t0 = time.perf_counter()
        for _ in range(20):
            live.live.refresh()
        refresh_ms = (time.perf_counter() - t0) / 20 * 1000
        t0 = time.perf_counter()
        live.report()
        report_ms = (time.perf_counter() - t0) * 1000
        live.close()
    p = percentiles(lat)
    return {"p50_ms": p["p50"], "p99_ms": p["p99"], "requests": requests, "postprocess_us": plain,
            "report_us": out["report_us"], "apply_us": out["apply_us"],
            "report_pct_of_p50": 100 * out["report_us"] / 1000 / p["p50"],
            "apply_pct_of_p50": 100 * out["apply_us"] / 1000 / p["p50"], "refresh_ms": refresh_ms,
            "get_prior_ms": report_ms, "threads": predictor.threads}


# ---------------------------------------------------------------------------------------------------------------------
# goals, tables, plot
# ---------------------------------------------------------------------------------------------------------------------


def goals(rows: list[dict[str, Any]], c: dict[str, Any], demo: str, stream: int, window: int,
          method: str) -> list[dict]:
    """The issue's goals, on the demo package with `method` (the one auto picks for it; every head and both methods
    are in the tables)."""
    by = {r["scenario"]: r for r in rows if r["model"] == demo and r["method"] == method}
    out = []
    at = {s: by[s]["tv"].get(stream if s != "switch" else 2 * stream) for s in SHIFTED if s in by}
    out.append({"goal": f"total-variation error of the estimate after {stream:,} images, each shifted stream "
                        f"({demo}, {method}, the default auto's choice; mean of seeds)",
                "target": "<= 0.05", "measured": ", ".join(f"{s} {v:.3f}" for s, v in at.items() if v is not None),
                "met": all(v is not None and v <= 0.05 for v in at.values())})
    parts, met = [], True
    for s in ("train", "reversed"):
        r = by[s]
        gap, gain = r["acc_ceiling"] - r["acc_unadapted"], r["acc_online"] - r["acc_unadapted"]
        share = gain / gap if gap > 0 else float("nan")
        parts.append(f"{s}: {r['acc_unadapted']:.1f} -> {r['acc_online']:.1f} % (ceiling {r['acc_ceiling']:.1f}; "
                     f"{100 * share:.0f} % of the gap)")
        met = met and gap > 0 and share >= 0.5
    out.append({"goal": f"accuracy adapted (online, apply) vs unadapted, train-prior and reversed streams ({demo}, "
                        f"{method})",
                "target": ">= half of the gap to the true-prior ceiling", "measured": "; ".join(parts), "met": met})
    u = by["uniform"]
    d = u["acc_online"] - u["acc_unadapted"]
    out.append({"goal": f"accuracy on the uniform stream with apply on ({demo}, {method})", "target": ">= -0.3 pt",
                "measured": f"{u['acc_unadapted']:.2f} -> {u['acc_online']:.2f} % ({d:+.2f} pt)", "met": d >= -0.3})
    out.append({"goal": "extra CPU per one-image request with report / apply, vs the p50 of one request in process "
                        "on the demo model",
                "target": "< 2 % of p50",
                "measured": (f"report {c['report_us']:.1f} us ({c['report_pct_of_p50']:.2f} %), apply "
                             f"{c['apply_us']:.1f} us ({c['apply_pct_of_p50']:.2f} %) of p50 {c['p50_ms']:.3f} ms"),
                "met": max(c["report_pct_of_p50"], c["apply_pct_of_p50"]) < 2.0})
    sw = by.get("switch")
    if sw is not None:
        pure = by["reversed"]["tv"][stream]
        traj = dict(zip(sw["switch"]["after"], sw["switch"]["tv_new"]))
        at_window = traj.get(window)
        follow = next((n for n in sorted(traj) if all(traj[m] <= pure + 0.01 for m in traj if m >= n)), None)
        rebound = sw["switch"]["rebound"]
        out.append({"goal": f"switch halfway (training prior -> reversed), window {window:,} ({demo}, {method})",
                    "target": "follows within the window, no oscillation",
                    "measured": (f"within 0.01 of a pure reversed stream's error ({pure:.3f}) from {follow} images "
                                 f"after the switch (TV {at_window:.3f} at {window}); largest rebound "
                                 f"{rebound:.3f}"),
                    "met": follow is not None and follow <= window and rebound <= 0.02})
    return out


def tables(rows: list[dict[str, Any]], demo: str, stream: int, auto: dict[str, str]) -> str:
    """The Markdown body: TV against images (demo, the method auto picks), every head after the stream, accuracies
    (`auto`: model name -> the method the default picks for it, marked in the tables)."""
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    demo_rows = [r for r in rows if r["model"] == demo and r["method"] == auto[demo]]
    steps = [n for n in CHECKPOINTS if n < stream] + [stream]
    t1 = markdown_table([{"stream": r["scenario"], **{f"{n:,}": r["tv"].get(n) for n in steps}} for r in demo_rows],
                        ["stream", *[f"{n:,}" for n in steps]], floatfmt="{:.3f}")
    t2_rows = []
    for (model, method) in dict.fromkeys((r["model"], r["method"]) for r in rows):
        sub = {r["scenario"]: r for r in rows if (r["model"], r["method"]) == (model, method)}
        t2_rows.append({"model": model, "method": method, "auto": "yes" if auto.get(model) == method else "", **{
            s: sub[s]["tv"].get(stream if s != "switch" else 2 * stream) for s in scen if s in sub}})
    t2 = markdown_table(t2_rows, ["model", "method", "auto", *scen], floatfmt="{:.3f}")
    t3_rows = []
    for (model, method) in dict.fromkeys((r["model"], r["method"]) for r in rows):
        sub = {r["scenario"]: r for r in rows if (r["model"], r["method"]) == (model, method)}
        t3_rows.append({"model": model, "method": method, "auto": "yes" if auto.get(model) == method else "", **{
            s: (f"{sub[s]['acc_unadapted']:.1f} / {sub[s]['acc_online']:.1f} / {sub[s]['acc_transductive']:.1f} / "
                f"{sub[s]['acc_ceiling']:.1f}") for s in scen if s in sub}})
    t3 = markdown_table(t3_rows, ["model", "method", "auto", *scen])
    return "\n\n".join([
        f"## Total-variation error of the estimate against images seen ({demo}, {auto[demo]}, mean of seeds)", t1,
        f"## Every head: total-variation error after {stream:,} images (switch: after {2 * stream:,}, against the "
        "second prior; auto: the method the default LTSERVE_PRIOR_METHOD=auto picks for the model)", t2,
        "## Accuracy (%): unadapted / adapted online (apply) / adapted transductively (batch) / true prior (ceiling)",
        t3])


def plot(rows: list[dict[str, Any]], demo: str, stream: int, auto: dict[str, str]):
    def draw_(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        ax = axes[0]
        for r in rows:
            if r["model"] == demo and r["method"] == auto[demo] and r["scenario"] != "switch":
                xs = sorted(r["tv"])
                ax.plot(xs, [r["tv"][n] for n in xs], marker=".", label=r["scenario"])
        ax.axhline(0.05, color="grey", linestyle="--", linewidth=0.8, label="goal 0.05")
        ax.set_xlabel("images seen")
        ax.set_ylabel("total-variation error")
        ax.set_title(f"{demo}: {auto[demo]} estimate (auto's choice)")
        ax.set_ylim(0, None)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax = axes[1]
        for r in rows:
            if (r["scenario"] == "switch" and r["model"] in (demo, "run la")
                    and r["method"] == auto.get(r["model"])):
                xs = sorted(r["tv"])
                ax.plot(xs, [r["tv"][n] for n in xs], marker=".", label=f"{r['model']} ({r['method']})")
        ax.axvline(stream, color="grey", linewidth=0.8)
        ax.set_xlabel("images seen (switch at the grey line)")
        ax.set_ylabel("TV error against the current prior")
        ax.set_title("switch: training prior -> reversed")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax = axes[2]
        sub = [r for r in rows if r["model"] == demo and r["method"] == auto[demo]]
        x = np.arange(len(sub))
        for i, (k, label) in enumerate((("acc_unadapted", "unadapted"), ("acc_online", "adapted online"),
                                        ("acc_ceiling", "true prior"))):
            ax.bar(x + (i - 1) * 0.27, [r[k] for r in sub], 0.27, label=label)
        ax.set_xticks(x, [r["scenario"] for r in sub], rotation=20)
        lo = min(r["acc_unadapted"] for r in sub)
        ax.set_ylim(max(0, lo - 8), 100)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{demo}: accuracy ({auto[demo]})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw_


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.label_shift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, NAME)
    parser.add_argument("--run", type=Path, default=None, help="a trained run of the default recipe to reuse")
    parser.add_argument("--seeds", default=None, help="comma-separated stream seeds (default 0..4; --smoke: 0)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the trained run (default: tmp, deleted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ltserve.runtime.prior import DEFAULT_WINDOW

    out = output_dir(args, NAME)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([args.seed] if args.smoke else list(range(5)))
    stream = 400 if args.smoke else STREAM
    started = time.perf_counter()
    images, labels = test_set()
    demo, predictor = demo_model(images)
    models, run_info = [demo], {}
    work = args.work or Path(tempfile.mkdtemp(prefix="ltserve-label-shift-"))
    try:
        if not args.smoke:
            run_models_, run_info = run_models(args.run, work)
            models += run_models_
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    meta = predictor.meta
    scen = scenarios(meta.class_counts, meta.labels)
    window = min(DEFAULT_WINDOW, stream)
    t0 = time.perf_counter()
    streams = run_streams(models, labels, scen, seeds, stream, window)
    sim_s = time.perf_counter() - t0
    rows = aggregate(streams, stream)
    c = cost(predictor, demo, images, 2000 if args.smoke else 20000, 200 if args.smoke else 3000)
    auto = {m.name: m.auto[0] for m in models}
    goal_rows = goals(rows, c, demo.name, stream, window, auto[demo.name])
    cost_table = markdown_table([c], ["p50_ms", "p99_ms", "postprocess_us", "report_us", "apply_us",
                                      "report_pct_of_p50", "apply_pct_of_p50", "refresh_ms", "get_prior_ms"],
                                floatfmt="{:.3f}")
    body = "\n\n".join([
        "## Goals", markdown_table([{**g, "met": "yes" if g["met"] else "NO"} for g in goal_rows],
                                   ["goal", "target", "measured", "met"]),
        tables(rows, demo.name, stream, auto),
        "## Cost per request (demo model, in process): p50 of one request; what the service's live prior adds to "
        "one (CPU, re-estimates amortised) over the plain postprocess; one re-estimate; one GET /prior",
        cost_table])
    notes = (f"Streams: Fashion-MNIST test, {stream:,} images each (switch: {stream:,} + {stream:,}), exact class "
             f"counts, shuffled; seeds {seeds}; " + "; ".join(f"{k}: {v['about']}" for k, v in scen.items())
             + f". Estimator: the service's defaults (window {window:,} images, re-estimated every 200, floor 200, "
             "1 pseudo-image per class, dead band 0.05, cap 3 nats), one image per request; online accuracy uses "
             "the shift known before each image. Models: " + ", ".join(f"{m.name} ({m.source})" for m in models)
             + (f"; run {run_info.get('run')} ({run_info.get('epochs')} epochs of configs/fashion_lt.yaml)"
                if run_info else "")
             + f". Goals, first table and plot: {demo.name} with {auto[demo.name]}, what the default "
             f"LTSERVE_PRIOR_METHOD=auto resolves to ({demo.auto[1].split(': ', 1)[-1]}). Cost (the default estimator, "
             f"{auto[demo.name]}): p50 over {3000 if not args.smoke else 200} one-image requests "
             f"(ONNX Runtime, {c['threads']} threads); the live prior's CPU over {c['requests']:,} one-image "
             "requests through the service's live-prior step, less the plain postprocess. "
             f"Simulation {sim_s:.0f} s, total {time.perf_counter() - started:.0f} s.")
    config = {"stream": stream, "seeds": seeds, "checkpoints": list(CHECKPOINTS), "window": window,
              "models": [{"name": m.name, "source": m.source} for m in models], "run": run_info,
              "smoke": args.smoke, "wall_seconds": time.perf_counter() - started,
              "auto": {"demo": auto[demo.name], "reason": demo.auto[1], "models": auto}}
    write_results(out, NAME, config, {"goals": goal_rows, "rows": rows, "cost": c, "streams": streams}, body,
                  plot(rows, demo.name, stream, auto), notes)
    print(f"{NAME}: results in {out}")
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
