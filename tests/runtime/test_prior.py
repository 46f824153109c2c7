"""Label-shift estimation and adaptation (ltserve.runtime.prior), what export records for it, and
`ltserve predict --adapt-prior`.

Synthetic posteriors come from a model that is calibrated by construction (Gaussian classes, exact Bayes
posteriors), so the true prior is known and the estimators' errors can be held to their own confidence measure. Real
model outputs come from the committed package models/fashion-lt on Fashion-MNIST test images drawn with a skewed mix,
and from the tiny run's exported package (tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.errors import ConfigError
from ltserve.heads.calibrate import chi2_sf, fit_class_bias
from ltserve.heads.head import served_prior
from ltserve.package import load_package, read_model_json
from ltserve.runtime.prior import (BBSE_MIN_VAL_PER_CLASS, EstimatorSettings, LiveEstimator, PackagePrior,
                                   PriorWindow, adapt_logits, bbse_usable, decay_weights, em_prior, estimate_prior,
                                   merge_samples, prior_shift, resolve_method, softmax64, tv_distance)
from package_helpers import read_fashion

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "fashion-lt"
C = 4
MEANS = np.array([[0.0, 0.0], [2.2, 0.0], [0.0, 2.2], [2.2, 2.2]])


def gaussian_stream(pi: np.ndarray, n: int, seed: int, source: np.ndarray | None = None,
                    bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (n, C), labels): x | y ~ N(MEANS[y], I); logits = the exact log posterior under `source` (+ bias)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(pi), size=n, p=pi)
    x = MEANS[y] + rng.normal(size=(n, 2))
    src = np.full(C, 1.0 / C) if source is None else source
    logits = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1) + np.log(src)
    return (logits + (0.0 if bias is None else bias)).astype(np.float32), y


# ---------------------------------------------------------------------------------------------------------------------
# estimators on synthetic posteriors with known priors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pi", [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.05, 0.15, 0.3, 0.5]])
def test_em_recovers_known_priors_within_its_confidence(pi):
    pi = np.asarray(pi)
    pkg = PackagePrior.uniform(C)
    errors, expected = [], []
    for seed in range(8):
        logits, _ = gaussian_stream(pi, 3000, seed)
        est = estimate_prior(logits, pkg, "em")
        assert est.method == "em" and est.converged and est.n == 3000
        assert est.prior.shape == (C,) and abs(est.prior.sum() - 1) < 1e-9 and (est.prior > 0).all()
        errors.append(tv_distance(est.prior, pi))
        expected.append(est.expected_tv_error)
    # unbiased: the mean error is what the confidence measure says, within sampling noise of 8 runs
    assert 0.4 * np.mean(expected) < np.mean(errors) < 2.0 * np.mean(expected), (errors, expected)
    assert max(errors) < 0.06


def test_em_with_a_non_uniform_source_prior():
    """Posteriors calibrated for a long-tailed mix: EM reads them against that mix."""
    src = np.array([0.55, 0.25, 0.15, 0.05])
    pi = np.array([0.1, 0.2, 0.3, 0.4])
    logits, _ = gaussian_stream(pi, 6000, 1, source=src)
    right = estimate_prior(logits, PackagePrior(np.full(C, 0.25), src), "em")
    wrong = estimate_prior(logits, PackagePrior.uniform(C), "em")
    assert tv_distance(right.prior, pi) < 0.03 < tv_distance(wrong.prior, pi)


def test_bbse_recovers_known_priors_from_a_labelled_confusion_matrix():
    val_logits, val_y = gaussian_stream(np.full(C, 0.25), 8000, 100)
    confusion = np.zeros((C, C), dtype=int)
    np.add.at(confusion, (val_y, val_logits.argmax(1)), 1)
    pkg = PackagePrior.uniform(C, confusion)
    pi = np.array([0.6, 0.2, 0.15, 0.05])
    logits, _ = gaussian_stream(pi, 5000, 7)
    est = estimate_prior(logits, pkg, "bbse")
    assert est.method == "bbse" and est.extra["condition_number"] < 10
    assert tv_distance(est.prior, pi) < 0.04
    assert 0 < est.expected_tv_error < 0.05


def test_bbse_needs_the_confusion_matrix():
    logits, _ = gaussian_stream(np.full(C, 0.25), 500, 0)
    with pytest.raises(ConfigError, match="confusion matrix.*re-export.*method em"):
        estimate_prior(logits, PackagePrior.uniform(C), "bbse")
    with pytest.raises(ConfigError, match="em, bbse|'em'"):
        estimate_prior(logits, PackagePrior.uniform(C), "median")


def test_auto_picks_bbse_only_on_a_usable_confusion_matrix():
    """auto: bbse when the package records a confusion matrix with enough val images per class and a small condition
    number, else em, with the reason; em and bbse stay what they say."""
    good = np.diag([20.0] * C)
    good[0, 1] = good[1, 0] = 4  # some confusion, M still well conditioned
    method, why = resolve_method("auto", PackagePrior.uniform(C, good), "LTSERVE_PRIOR_METHOD")
    assert method == "bbse" and why.startswith("LTSERVE_PRIOR_METHOD=auto: bbse") and "condition number" in why
    assert bbse_usable(PackagePrior.uniform(C, good))[0]
    few = np.diag([float(BBSE_MIN_VAL_PER_CLASS)] * C)
    few[2, 2] = BBSE_MIN_VAL_PER_CLASS - 1  # one class short of the floor
    method, why = resolve_method("auto", PackagePrior.uniform(C, few))
    assert method == "em" and "classes [2]" in why
    mixed = np.diag([40.0] * C)
    mixed[:2, :2] = [[21, 19], [19, 21]]  # classes 0 and 1 confused half the time: cond(M) = 20
    method, why = resolve_method("auto", PackagePrior.uniform(C, mixed))
    assert method == "em" and "condition number is 20" in why
    never = np.diag([20.0] * C)
    never[3] = [0, 0, 20, 0]  # class 3 never predicted: M is singular
    assert resolve_method("auto", PackagePrior.uniform(C, never))[0] == "em"
    method, why = resolve_method("auto", PackagePrior.uniform(C))  # an older package: no matrix
    assert method == "em" and "no val confusion matrix" in why
    # explicit choices are kept: bbse runs on any recorded matrix, and is refused without one
    assert resolve_method("bbse", PackagePrior.uniform(C, mixed))[0] == "bbse"
    assert resolve_method("em", PackagePrior.uniform(C, good)) == ("em", "prior method=em (set explicitly)")
    with pytest.raises(ConfigError, match="bbse needs the val confusion matrix"):
        resolve_method("bbse", PackagePrior.uniform(C))
    with pytest.raises(ConfigError, match="auto, em, bbse"):
        resolve_method("median", PackagePrior.uniform(C))
    # estimate_prior and LiveEstimator take auto too (the default), and say which estimator ran
    logits, _ = gaussian_stream(np.array([0.4, 0.3, 0.2, 0.1]), 400, 3)
    assert estimate_prior(logits, PackagePrior.uniform(C, good), "auto").method == "bbse"
    assert EstimatorSettings().method == "auto"
    live = LiveEstimator(PackagePrior.uniform(C), EstimatorSettings(every=100))
    live.observe(logits)
    assert live.method == "em" and live.estimate.method == "em" and "auto: em" in live.method_reason


def test_smoothing_and_the_minimum_sample_count():
    pkg = PackagePrior.uniform(C)
    logits, _ = gaussian_stream(np.array([1.0, 0, 0, 0]), 150, 3)
    few = estimate_prior(logits, pkg, "em")  # below the default floor of 200
    assert few.method == "target" and not few.estimated and np.allclose(few.prior, 0.25)
    assert "fewer than the 200" in few.extra["reason"]
    plain = em_prior(logits, pkg.source, pseudo_count=0)[0]
    smooth = em_prior(logits, pkg.source, pseudo_count=5)[0]
    assert plain[1:].max() < 0.005  # maximum likelihood drives absent classes to ~0
    assert smooth[1:].min() > 0.01  # 5 pseudo-images per class keep them away from 0 (log ratios stay finite)


def test_degenerate_streams_no_traffic_one_class_a_class_never_predicted():
    pkg = PackagePrior.uniform(C)
    none = estimate_prior(np.zeros((0, C), np.float32), pkg, "em")
    assert none.method == "target" and none.n == 0 and np.allclose(none.prior, 0.25)
    # one class only: the estimate goes there, the shift is capped
    logits, _ = gaussian_stream(np.array([0.0, 0.0, 1.0, 0.0]), 2000, 4)
    one = estimate_prior(logits, pkg, "em")
    assert one.prior.argmax() == 2 and one.prior[2] > 0.95 and np.isfinite(one.std).all()
    shift = prior_shift(one.prior, pkg.source, max_shift=2.0)
    assert shift is not None and np.abs(shift).max() <= 2.0 + 1e-6 and shift.argmax() == 2
    # a class the model never predicts: finite estimate, no NaN anywhere
    logits, _ = gaussian_stream(np.full(C, 0.25), 1000, 5)
    logits[:, 3] = -50.0
    est = estimate_prior(logits, pkg, "em")
    assert np.isfinite(est.prior).all() and est.prior[3] < 0.01 and np.isfinite(est.expected_tv_error)
    adapted = adapt_logits(logits, prior_shift(est.prior, pkg.source))
    assert np.isfinite(adapted).all()


def test_prior_shift_dead_band_cap_and_bayes():
    src = np.full(C, 0.25)
    assert prior_shift(np.array([0.26, 0.24, 0.25, 0.25]), src, dead_band=0.05) is None
    near = prior_shift(np.array([0.32, 0.18, 0.25, 0.25]), src, dead_band=0.05)  # TV 0.07: moved by 0.05
    far = prior_shift(np.array([0.32, 0.18, 0.25, 0.25]), src, dead_band=0.0)
    assert near is not None and far is not None and 0 < near[0] - near[1] < far[0] - far[1]
    assert np.isclose(far[0] - far[1], math.log(0.32 / 0.18), atol=1e-6)
    # with the true prior and no dead band, adapting is Bayes' rule: the adapted posteriors are the exact ones
    pi = np.array([0.55, 0.25, 0.15, 0.05])
    logits, _ = gaussian_stream(pi, 50, 6)
    exact, _ = gaussian_stream(pi, 50, 6, source=pi)
    adapted = adapt_logits(logits, prior_shift(pi, src, max_shift=10, dead_band=0.0))
    assert np.allclose(softmax64(adapted), softmax64(exact), atol=1e-5)


def test_class_bias_fit_and_test():
    bias = np.array([0.8, -0.3, -0.4, -0.1])
    logits, y = gaussian_stream(np.full(C, 0.25), 4000, 8, bias=bias)
    fit = fit_class_bias(logits, y)
    assert fit.applied and fit.p_value < 1e-6 and fit.shrinkage > 0.9
    assert np.allclose(fit.fitted, -(bias - bias.mean()), atol=0.15)
    calibrated, y2 = gaussian_stream(np.full(C, 0.25), 4000, 9)
    assert not fit_class_bias(calibrated, y2).applied
    assert np.all(fit_class_bias(calibrated, y2).bias == 0)
    # a class missing from the split: nothing recorded (its offset is unbounded)
    keep = y2 != 3
    assert not fit_class_bias(calibrated[keep], y2[keep]).applied
    # EM reads a biased head right once the bias is in the source prior
    pi = np.array([0.1, 0.2, 0.3, 0.4])
    skewed, _ = gaussian_stream(pi, 6000, 10, bias=bias)
    src = np.exp(-fit.bias) / np.exp(-fit.bias).sum()
    good = estimate_prior(skewed, PackagePrior(np.full(C, 0.25), src), "em")
    bad = estimate_prior(skewed, PackagePrior.uniform(C), "em")
    assert tv_distance(good.prior, pi) < 0.04 < tv_distance(bad.prior, pi)


def test_chi2_tail_matches_tables():
    # chi-square critical values (dof: x at p = 0.05 and 0.01)
    for dof, x05, x01 in ((1, 3.841, 6.635), (3, 7.815, 11.345), (9, 16.919, 21.666), (99, 123.225, 134.642)):
        assert abs(chi2_sf(x05, dof) - 0.05) < 0.004 and abs(chi2_sf(x01, dof) - 0.01) < 0.002


def test_served_prior_of_a_train_target_with_temperature():
    w = np.array([0.6, 0.3, 0.1])
    assert np.allclose(served_prior(None, 2.0, 3), 1 / 3)
    s = served_prior(w, 2.0, 3)
    assert np.allclose(s, np.sqrt(w) / np.sqrt(w).sum())
    assert np.allclose(served_prior(w, 1.0, 3), w)


# ---------------------------------------------------------------------------------------------------------------------
# windows, decay, the live estimator
# ---------------------------------------------------------------------------------------------------------------------


def test_window_is_a_ring_buffer_in_time_order_and_merges_by_time():
    w = PriorWindow(3, capacity=5)
    for i in range(4):
        w.observe(np.full((2, 3), i, np.float32), t=100.0 + i)
    logits, times = w.samples()
    assert w.size == 5 and w.total == 8
    assert times.tolist() == [101.0, 102.0, 102.0, 103.0, 103.0] and logits[:, 0].tolist() == [1, 2, 2, 3, 3]
    other = (np.full((3, 3), 9, np.float32), np.array([101.5, 102.5, 104.0]))
    merged, mt = merge_samples([w.samples(), other], capacity=4, since=0.0)
    assert mt.tolist() == [102.5, 103.0, 103.0, 104.0] and merged[:, 0].tolist() == [9, 3, 3, 9]
    assert merge_samples([w.samples(), other], capacity=10, since=103.0)[1].tolist() == [103.0, 103.0, 104.0]
    w.drop_before(103.0)
    assert w.samples()[1].tolist() == [103.0, 103.0]
    w.load(*other)
    assert w.samples()[1].tolist() == [101.5, 102.5, 104.0]
    assert np.allclose(decay_weights(3, 1.0), [0.25, 0.5, 1.0]) and decay_weights(3, 0) is None


def test_live_estimator_follows_a_switch_within_its_window_without_oscillating():
    a, b = np.array([0.7, 0.1, 0.1, 0.1]), np.array([0.1, 0.1, 0.1, 0.7])
    la, _ = gaussian_stream(a, 2000, 11)
    lb, _ = gaussian_stream(b, 2000, 12)
    live = LiveEstimator(PackagePrior.uniform(C), EstimatorSettings(window=1000, every=100))
    distances = []
    for i, chunk in enumerate(np.split(np.concatenate([la, lb]), 160)):
        live.observe(chunk, t=float(i))
        if (i + 1) % 4 == 0 and i >= 79:  # every 100 images after the switch
            distances.append(tv_distance(live.estimate.prior, b))
    assert distances[-1] < 0.05 and distances[10] < 0.06  # the window (1000 images) after the switch: there
    assert all(later <= earlier + 0.02 for earlier, later in zip(distances, distances[1:])), distances
    assert live.shift is not None and live.shift.argmax() == 3
    live.reset()
    assert live.estimate.method == "target" and live.shift is None and live.window.size == 0


def test_live_estimator_floor_and_decay():
    pi = np.array([0.1, 0.1, 0.1, 0.7])
    logits, _ = gaussian_stream(pi, 1000, 13)
    live = LiveEstimator(PackagePrior.uniform(C), EstimatorSettings(min_samples=500, every=100, half_life=200))
    live.observe(logits[:400])
    assert live.estimate.method == "target" and live.shift is None  # below the floor: nothing applied
    live.observe(logits[400:])
    assert live.estimate.method == "em" and live.shift is not None
    assert live.estimate.n == 1000 and live.estimate.n_effective < 600  # decayed weights
    with pytest.raises(ConfigError, match="dead_band"):
        EstimatorSettings(dead_band=1.5)
    with pytest.raises(ConfigError, match="bbse needs the val confusion"):
        LiveEstimator(PackagePrior.uniform(C), EstimatorSettings(method="bbse"))


# ---------------------------------------------------------------------------------------------------------------------
# real model outputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_test():
    return read_fashion("t10k")


def skewed_indices(labels: np.ndarray, pi: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n test indices with class counts round(n * pi) (no image twice), shuffled."""
    rng = np.random.default_rng(seed)
    counts = np.floor(pi * n).astype(int)
    counts[np.argsort(-(pi * n - counts))[:n - counts.sum()]] += 1
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == j), k, replace=False) for j, k in enumerate(counts)])
    rng.shuffle(idx)
    return idx


def reversed_train_prior(meta) -> np.ndarray:
    counts = np.asarray(meta.class_counts, dtype=np.float64)
    return (counts / counts.sum())[::-1].copy()


def old_style_package(dst: Path) -> Path:
    """A copy of the committed package as packages exported before the label-shift and JPEG-draft records were:
    model.json without `label_shift` and `verification.jpeg_draft` (and so `preprocess.allow_draft` false). Only
    model.onnx is hashed in model.json (`files`), so the edited model.json still loads."""
    import shutil

    shutil.copytree(DEMO, dst)
    raw = json.loads((dst / "model.json").read_text())
    raw.pop("label_shift", None)
    raw["verification"].pop("jpeg_draft", None)
    raw["preprocess"]["allow_draft"] = False
    (dst / "model.json").write_text(json.dumps(raw, indent=2))
    return dst


def test_demo_package_on_a_skewed_fashion_mnist_stream(fashion_test, tmp_path):
    """The committed package on 2,000 test images, reversed long tail: EM and BBSE (on the package's val confusion
    matrix) both find the stream's prior, and adapting to either estimate gets more of them right (measured when
    written: TV error em 0.103, bbse 0.066, target 0.490; top-1 81.1 -> 82.8 em, 84.5 bbse). The same package as an
    older model.json (no label_shift): EM only, trusting the head's calibration (a uniform source prior)."""
    from ltserve.errors import ConfigError
    from ltserve.runtime import Predictor

    images, labels = fashion_test
    predictor = Predictor(DEMO, threads=1, max_batch_size=256)
    pkg = PackagePrior.from_meta(predictor.meta)
    assert predictor.meta.label_shift is not None and pkg.confusion is not None
    pi = reversed_train_prior(predictor.meta)
    idx = skewed_indices(labels, pi, 2000, 0)
    logits = predictor.predict(predictor.preprocess(list(images[idx][..., None])))
    y = labels[idx]
    before = np.mean(logits.argmax(1) == y)
    for method, bound in (("em", 0.15), ("bbse", 0.1)):
        est = estimate_prior(logits, pkg, method)
        assert tv_distance(est.prior, pi) < bound < tv_distance(pkg.target, pi), method
        after = np.mean(adapt_logits(logits, prior_shift(est.prior, pkg.source)).argmax(1) == y)
        assert after > before + 0.01, (method, before, after)

    assert resolve_method("auto", pkg)[0] == "bbse"  # the default picks bbse on the committed package
    old = PackagePrior.from_meta(read_model_json(old_style_package(tmp_path / "old")))
    assert old.confusion is None and np.allclose(old.source, 0.1)
    assert resolve_method("auto", old)[0] == "em"  # and em on an older one
    assert tv_distance(estimate_prior(logits, old, "em").prior, pi) < 0.15
    with pytest.raises(ConfigError, match="bbse needs the val confusion matrix"):
        estimate_prior(logits, old, "bbse")


def test_export_records_the_val_confusion_and_class_bias(tiny_package, tiny_rebalanced_run):
    meta = load_package(tiny_package)
    ls = meta.label_shift
    assert ls is not None and ls.split == "val"
    c = len(meta.labels)
    k = np.asarray(ls.confusion)
    assert k.shape == (c, c) and k.sum() == ls.n > 0
    assert len(ls.bias) == c and set(ls.bias_test) >= {"statistic", "p_value", "applied", "shrinkage", "fitted"}
    assert (np.asarray(ls.bias) == 0).all() != ls.bias_test["applied"]
    pkg = PackagePrior.from_meta(meta)
    assert pkg.confusion is not None and abs(pkg.source.sum() - 1) < 1e-9
    # the recorded confusion is the package's own argmax on val
    from ltserve.features.cache import cached_features
    from ltserve.rundir import open_run

    run = open_run(tiny_rebalanced_run)
    x, y = cached_features(run, "val", progress=False)
    pred = run.head("tau_norm").logits(x).argmax(1)
    assert np.trace(k) == int(np.sum(pred == y))


def test_package_without_label_shift_loads_and_a_bad_one_is_refused(tmp_path, fashion_test):
    from ltserve.errors import PackageError
    from ltserve.runtime import Predictor

    assert np.asarray(read_model_json(DEMO).label_shift.confusion).shape == (10, 10)  # the committed package's
    pkg = old_style_package(tmp_path / "pkg")
    predictor = Predictor(pkg, threads=1)  # an older model.json loads, verified, and serves
    assert predictor.meta.label_shift is None and not predictor.meta.preprocess.allow_draft
    Image.fromarray(fashion_test[0][0]).save(tmp_path / "x.png")
    assert len(predictor.classify_bytes([(tmp_path / "x.png").read_bytes()], top_k=1)) == 1
    raw = json.loads((pkg / "model.json").read_text())
    raw["label_shift"] = {"split": "val", "n": 4, "confusion": [[1, 0], [0, 3]]}
    (pkg / "model.json").write_text(json.dumps(raw))
    with pytest.raises(PackageError, match="label_shift.confusion must be 10 x 10"):
        read_model_json(pkg)


# ---------------------------------------------------------------------------------------------------------------------
# ltserve predict --adapt-prior
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skewed_list(tmp_path_factory, fashion_test) -> tuple[Path, np.ndarray]:
    """1,000 Fashion-MNIST test PNGs drawn with the reversed long tail, and a labelled list of them."""
    images, labels = fashion_test
    meta = read_model_json(DEMO)
    idx = skewed_indices(labels, reversed_train_prior(meta), 1000, 1)
    root = tmp_path_factory.mktemp("skewed")
    lines = []
    for k, i in enumerate(idx):
        Image.fromarray(images[i]).save(root / f"{k:04d}.png")
        lines.append(f"{k:04d}.png\t{labels[i]}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt", labels[idx]


def test_predict_adapt_prior_writes_adapted_rows_and_reports_both_accuracies(tmp_path, skewed_list, capsys):
    from ltserve.cli.predict import cli

    listing, y = skewed_list
    out = tmp_path / "preds.jsonl"
    code = cli([str(listing), "--model", str(DEMO), "--out", str(out), "--workers", "0", "--adapt-prior",
                "--summary-json", str(tmp_path / "summary.json"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "prior estimated over 1000 files (bbse" in printed and "without the adaptation" in printed
    s = json.loads((tmp_path / "summary.json").read_text())
    prior = s["prior"]
    # a bare --adapt-prior is auto: bbse on the committed package, which records a usable val confusion matrix
    assert prior["adapted"] and prior["method"] == "bbse" and prior["n"] == 1000
    assert prior["method_setting"] == "auto" and "--adapt-prior=auto: bbse" in prior["method_reason"]
    truth = reversed_train_prior(read_model_json(DEMO))
    # measured when written (bbse): TV error 0.054, top-1 81.5 -> 85.5 % (em gave 0.092, 81.5 -> 83.0 %)
    assert tv_distance(np.array(list(prior["estimate"].values())), truth) < 0.15
    assert s["accuracy"]["top1"] > s["accuracy_unadapted"]["top1"] + 0.01
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [f"{k:04d}.png" for k in range(1000)]  # input order
    assert np.isclose(np.mean([r["class_index"] == t for r, t in zip(rows, y)]), s["accuracy"]["top1"])
    assert not list(tmp_path.glob(".ltserve-adapt-*"))  # the memory map is gone
    # without --adapt-prior: the unadapted accuracy, no prior in the summary
    plain = tmp_path / "plain.jsonl"
    assert cli([str(listing), "--model", str(DEMO), "--out", str(plain), "--workers", "0", "--summary-json",
                str(tmp_path / "plain.json"), "--no-progress"]) == 0
    p = json.loads((tmp_path / "plain.json").read_text())
    assert "prior" not in p and np.isclose(p["accuracy"]["top1"], s["accuracy_unadapted"]["top1"])


def test_predict_adapt_prior_option_errors(tmp_path, skewed_list):
    from ltserve.batch.adapt import TransductiveAdapter
    from ltserve.batch.job import run_predict
    from ltserve.batch.options import PredictOptions

    listing, _ = skewed_list
    base = dict(inputs=[str(listing)], model=DEMO, out=tmp_path / "p.jsonl", workers=0, progress=False)
    with pytest.raises(ConfigError, match="--adapt-prior runs on --engine local"):
        run_predict(PredictOptions(**base, adapt_prior="em", engine="ray"))
    with pytest.raises(ConfigError, match="cannot be continued: pass --overwrite"):
        run_predict(PredictOptions(**base, adapt_prior="em", resume=True))
    with pytest.raises(ConfigError, match="--adapt-prior"):
        run_predict(PredictOptions(**base, adapt_prior="median"))
    old = old_style_package(tmp_path / "old")
    with pytest.raises(ConfigError, match="bbse needs the val confusion matrix"):  # an older model.json
        run_predict(PredictOptions(**{**base, "model": old}, adapt_prior="bbse"))
    adapter = TransductiveAdapter(read_model_json(old), 10, tmp_path / "p.jsonl")  # auto, the default: em there
    try:
        assert adapter.method == "em" and "no val confusion matrix" in adapter.method_reason
    finally:
        adapter.close()


def test_predict_adapt_prior_below_the_floor_leaves_rows_unadapted(tmp_path, skewed_list):
    from ltserve.batch.job import run_predict
    from ltserve.batch.options import PredictOptions

    listing, _ = skewed_list
    short = tmp_path / "short.txt"
    short.write_text("\n".join(f"{listing.parent / line}" for line in listing.read_text().splitlines()[:50]) + "\n")
    s = run_predict(PredictOptions(inputs=[str(short)], model=DEMO, out=tmp_path / "p.jsonl", workers=0,
                                   progress=False, adapt_prior="em"))
    assert s["prior"]["adapted"] is False and "fewer than the 200" in s["prior"]["not_adapted"]
    assert s["accuracy"]["top1"] == s["accuracy_unadapted"]["top1"]


def test_runtime_prior_does_not_import_torch():
    import subprocess

    code = "import sys, ltserve.runtime.prior, ltserve.batch.adapt; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_label_shift_benchmark_smoke(tmp_path):
    """benchmarks/label_shift.py --smoke: the results trio, goals in the README generator's shape."""
    if str(REPO) not in sys.path:  # `benchmarks` is a folder of scripts at the repo root
        sys.path.insert(0, str(REPO))
    from benchmarks import label_shift, perf_readme

    out = tmp_path / "cpu-test-machine" / "label_shift"
    assert label_shift.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == "label_shift" and (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    goals = data["results"]["goals"]
    assert len(goals) == 5 and all({"goal", "target", "measured", "met"} <= set(g) for g in goals)
    rows = data["results"]["rows"]
    assert {r["scenario"] for r in rows} == {"uniform", "train", "reversed", "one_class_50", "switch"}
    assert all(r["acc_ceiling"] >= r["acc_unadapted"] - 1e-9 for r in rows if r["scenario"] != "uniform")
    section = perf_readme.render(perf_readme.load_results(tmp_path), tmp_path)
    assert "### label_shift on" in section and "total-variation error of the estimate" in section


def test_predict_adapt_prior_bbse_on_a_package_that_records_the_confusion_matrix(tmp_path, tiny_package,
                                                                                 skewed_list):
    from ltserve.batch.job import run_predict
    from ltserve.batch.options import PredictOptions

    listing, _ = skewed_list
    s = run_predict(PredictOptions(inputs=[str(listing)], model=tiny_package, out=tmp_path / "p.jsonl", workers=0,
                                   progress=False, adapt_prior="bbse"))
    prior = s["prior"]
    assert prior["method"] == "bbse" and prior["n"] == 1000 and prior["condition_number"] > 1
    for key in ("estimate", "target"):  # as written (6 decimals): they sum to 1, not 1 +- 1e-6
        shares = list(prior[key].values())
        assert sum(round(v * 1e6) for v in shares) == 1_000_000 and round(sum(shares), 6) == 1.0, shares
        assert all(v >= 0 and round(v, 6) == v for v in shares)
    assert s["accuracy_unadapted"] is not None and s["accuracy"]["n"] == 1000


def test_round_distribution_writes_shares_that_sum_to_one_as_written():
    from ltserve.metrics import round_distribution

    rng = np.random.default_rng(0)
    cases = [np.full(10, 0.1000004), np.full(3, 1 / 3), np.array([0.5, 0.5, 0.0]), np.array([2.0, 1.0, 1.0]),
             *(rng.dirichlet(np.full(c, a)) for c in (2, 10, 100) for a in (0.1, 1.0, 10.0) for _ in range(20))]
    for p in cases:
        r = round_distribution(p)
        assert sum(round(v * 1e6) for v in r) == 1_000_000 and round(sum(r), 6) == 1.0, (p, r)
        assert all(v >= 0 and round(v, 6) == v for v in r)
        assert np.abs(np.array(r) - p / p.sum()).max() <= 0.5e-6 * len(p) + 1e-12  # the remainder on one share
    assert round_distribution([0.25, 0.75], digits=1) == [0.2, 0.8]
    with pytest.raises(ValueError, match="non-negative"):
        round_distribution([0.5, -0.1, 0.6])
