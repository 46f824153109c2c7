"""Open-set rejection: the scores, per-shot-group calibration, the package section and its round trip, the runtime
modes, old packages, export's score override, `ltserve evaluate --open-set` and `ltserve predict`'s columns.

Reuses the session's tiny trained run and package (tests/conftest.py); only facts that hold for every correct
outcome are asserted (no exact values that another BLAS could move)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.errors import ConfigError
from ltserve.open_set import (FEATURE_SCORES, LOGIT_SCORES, SCORES, acceptance, aupr, auroc, calibrate,
                              fit_feature_stats, fpr_at_tpr, oltr_f_measure, scores, unknown_mask)


# -- scores and metrics on known tiny cases ----------------------------------------------------------------------


def test_logit_scores_on_known_cases():
    confident, flat = [10.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    logits = np.array([confident, flat])
    msp = scores("msp", logits)
    assert msp[0] < 1e-3 and msp[1] == pytest.approx(2 / 3)
    assert scores("max_logit", logits).tolist() == [-10.0, -1.0]
    energy = scores("energy", logits)
    assert energy[1] == pytest.approx(-(1 + np.log(3)))
    assert energy[0] < energy[1]  # the confident row is less unknown
    # energy and max logit see scale, msp does not: a row scaled down is more unknown for both
    assert scores("energy", logits * 0.1)[0] > energy[0]


def test_feature_scores_on_known_cases():
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 5.0  # three classes in 4-d
    y = np.repeat(np.arange(3), 50)
    x = centres[y] + rng.normal(0, 0.1, size=(150, 4))
    stats = fit_feature_stats(x, y, 3)
    logits = np.zeros((2, 3))
    near_class, away = centres[1] + 0.01, np.array([0.0, 0.0, 0.0, 5.0])
    for name in FEATURE_SCORES:
        s = scores(name, logits, np.stack([near_class, away]), stats)
        assert s[0] < s[1], name
        assert (s >= 0).all()
    with pytest.raises(ValueError, match="features"):
        scores("mahalanobis", logits)
    with pytest.raises(ConfigError, match="did you mean 'energy'"):
        scores("enrgy", logits)


def _formula(name: str, logits: np.ndarray, features: np.ndarray, stats) -> np.ndarray:
    """The scores written out the straightforward way (float64, a loop over classes)."""
    z = np.asarray(logits, np.float64)
    if name in LOGIT_SCORES:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return {"msp": 1.0 - (e / e.sum(axis=1, keepdims=True)).max(axis=1),
                "energy": -np.log(np.exp(z).sum(axis=1)), "max_logit": -z.max(axis=1)}[name]
    f = np.asarray(features, np.float64)
    if name == "mahalanobis_raw":
        x, means, whiten = f, stats.raw_means, stats.raw_whiten
    else:
        u = f - stats.centre
        x, means, whiten = u / np.linalg.norm(u, axis=1, keepdims=True), stats.means, stats.whiten
    means, whiten = means.astype(np.float64), whiten.astype(np.float64)
    if name == "ncm_cosine":
        unit = means / np.linalg.norm(means, axis=1, keepdims=True)
        return np.array([1.0 - max(row @ m for m in unit) for row in x])
    precision = whiten @ whiten.T
    return np.array([min((row - m) @ precision @ (row - m) for m in means) for row in x])


@pytest.mark.parametrize("name", SCORES)
def test_scores_equal_their_formulas(name):
    """The serving path's rearranged arithmetic (`Scorer`) against the formulas, at batch 1 and a batch."""
    from ltserve.open_set import Scorer

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(5), [60, 30, 15, 8, 4])  # long-tailed
    x = rng.gamma(2.0, 1.0, size=(len(y), 16)) + 3.0 * np.eye(5, 16)[y]  # non-negative, like ReLU features
    stats = fit_feature_stats(x, y, 5)
    features = (rng.gamma(2.0, 1.5, size=(9, 16))).astype(np.float32)
    logits = rng.normal(0, 4, size=(9, 5)).astype(np.float32)
    scorer = Scorer(name, stats)
    for rows in (slice(0, 1), slice(0, 9)):
        want = _formula(name, logits[rows], features[rows], stats)
        got = scorer(logits[rows], features[rows])
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(want).max())))
        assert np.array_equal(got, scores(name, logits[rows], features[rows], stats))


def test_feature_stats_from_before_mahalanobis_raw():
    """Packages exported before mahalanobis_raw hold centre, means and whiten only: they load, score the L2 scores
    as before and refuse the raw one with a message that says to re-export."""
    from ltserve.open_set import FeatureStats, Scorer

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 20)
    stats = fit_feature_stats(rng.normal(size=(60, 6)) + np.eye(3, 6)[y] * 4, y, 3)
    old = FeatureStats(centre=stats.centre, means=stats.means, whiten=stats.whiten)
    back = FeatureStats.from_text(old.to_text())
    assert back.raw_means is None and back.scores() == ("ncm_cosine", "mahalanobis")
    assert stats.scores() == FEATURE_SCORES
    f = rng.normal(size=(4, 6)).astype(np.float32)
    logits = np.zeros((4, 3))
    assert np.array_equal(scores("mahalanobis", logits, f, back), scores("mahalanobis", logits, f, stats))
    with pytest.raises(ValueError, match="re-export"):
        Scorer("mahalanobis_raw", back)
    full = FeatureStats.from_text(stats.to_text())
    assert np.array_equal(full.raw_whiten, stats.raw_whiten)
    half = FeatureStats(centre=stats.centre, means=stats.means, whiten=stats.whiten, raw_means=stats.raw_means)
    with pytest.raises(ValueError, match="inconsistent"):
        FeatureStats.from_text(half.to_text())


def test_separation_metrics():
    known, unknown = np.array([0.0, 0.1, 0.2, 0.3]), np.array([1.0, 2.0])
    assert auroc(known, unknown) == 1.0 and aupr(known, unknown) == 1.0 and fpr_at_tpr(known, unknown) == 0.0
    assert auroc(known, known) == pytest.approx(0.5)
    assert auroc(unknown, known) == 0.0
    # OLTR: TP known right and accepted, FP known wrong and accepted, FN unknown accepted
    f = oltr_f_measure(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([False, False, True]),
                       np.array([True, False]))
    assert f == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))


def test_calibration_hits_its_target_in_every_shot_group():
    rng = np.random.default_rng(1)
    groups = ["many", "many", "medium", "few"]
    pred = rng.integers(0, 4, size=2000)
    # tail classes score as more unknown: one global threshold would reject them first
    score = rng.normal(size=2000) + np.array([0.0, 0.0, 1.0, 2.0])[pred]
    cal = calibrate(score, pred, groups, target=0.9, min_class_images=10_000)
    g = np.asarray(groups)[pred]
    for name in ("many", "medium", "few"):
        ok = ~unknown_mask(score[g == name], pred[g == name], np.asarray(cal["thresholds"]))
        assert 0.9 <= ok.mean() < 0.9 + 1.0 / (g == name).sum() + 1e-12
    assert set(cal["threshold_source"]) == {"group"}
    one = acceptance(score, pred, groups, [cal["global_threshold"]] * 4)
    assert one["few"] < 0.9 < one["many"]
    per_class = calibrate(score, pred, groups, target=0.9, min_class_images=100)
    assert per_class["threshold_source"] == ["class"] * 4
    with pytest.raises(ConfigError):
        calibrate(score, pred, groups, target=1.0)


# -- the package ---------------------------------------------------------------------------------------------------


def test_exported_package_round_trip(tiny_package):
    from ltserve.package import load_package, read_model_json

    meta = load_package(tiny_package)
    o = meta.open_set
    assert meta.features_name == "features" and list(meta.files) == ["model.onnx"]  # still one graph file
    assert o.stats_key is not None
    assert o is not None and o.score in SCORES and o.split == "val" and 0 < o.target < 1
    assert len(o.thresholds) == len(meta.labels) == len(o.threshold_source)
    assert set(o.candidates) == set(SCORES)
    # in-sample: the target share of val images is accepted in every group of the predicted class
    n_val = o.n
    for share in o.val_accepted["by_predicted_group"].values():
        assert share is None or share >= o.target - 1e-9
    assert n_val > 0
    again = read_model_json(tiny_package)
    assert again.open_set == o
    assert meta.graph.op_counts.get("Gemm") == 1


def test_predictor_modes_and_info(tiny_package):
    from ltserve.runtime import Predictor

    p = Predictor(tiny_package, threads=1, max_batch_size=4)
    assert p.open_set_mode == "flag"
    info = p.info()["open_set"]
    assert info["score"] == p.meta.open_set.score and info["mode"] == "flag" and len(info["thresholds"]) == 10
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28, 1), dtype=np.uint8) for _ in range(5)]
    batch = p.preprocess(images)
    logits, features = p.predict_outputs(batch)
    assert features is not None and features.shape[0] == 5 and np.allclose(logits, p.predict(batch), atol=1e-5)
    preds = p.postprocess(logits, 3, features=features)
    assert all(isinstance(x.unknown, bool) and np.isfinite(x.ood_score) for x in preds)
    score, unknown = p.open_set_scores(logits, features)
    assert [x.unknown for x in preds] == unknown.tolist()
    # reject: the unknown rows answer label null and keep their top_k
    r = Predictor(tiny_package, threads=1, max_batch_size=4, open_set="reject")
    r._thresholds = np.full(10, -np.inf)  # every image unknown
    rejected = r.postprocess(logits, 3, features=features)
    assert all(x.unknown and x.label is None and x.class_index is None and len(x.top_k) == 3 for x in rejected)
    off = Predictor(tiny_package, threads=1, max_batch_size=4, open_set="off").postprocess(logits, 3)
    assert all(x.unknown is None and x.ood_score is None and x.label is not None for x in off)
    with pytest.raises(ConfigError, match="open_set"):
        Predictor(tiny_package, open_set="maybe")


def test_old_package_without_features_or_thresholds(tmp_path):
    from package_helpers import build_random_rgb_package

    from ltserve.runtime import Predictor

    pkg = build_random_rgb_package(tmp_path / "old", size=16)
    assert "open_set" not in json.loads((pkg / "model.json").read_text())
    p = Predictor(pkg, threads=1, max_batch_size=2)
    assert p.open_set_mode == "off" and p.info()["open_set"]["score"] is None
    batch = p.preprocess([np.zeros((16, 16, 3), np.uint8)])
    logits, features = p.predict_outputs(batch)
    assert features is None
    (pred,) = p.postprocess(logits, 2, features=features)
    assert pred.unknown is None and pred.ood_score is None and pred.label is not None
    for mode in ("flag", "reject"):
        with pytest.raises(ConfigError, match="open-set thresholds"):
            Predictor(pkg, open_set=mode)


def test_package_with_stats_from_before_mahalanobis_raw(tiny_package, tmp_path):
    """A package exported before mahalanobis_raw (score mahalanobis, no raw statistics in model.onnx) still
    serves its score, says so in info(), and `ltserve evaluate --open-set` lists the scores it allows."""
    import shutil

    import onnx

    from ltserve.data import ImageSet
    from ltserve.evaluate.package import open_set_evaluation
    from ltserve.export.open_set import embed_stats
    from ltserve.open_set import STATS_KEY, FeatureStats
    from ltserve.package import file_entries
    from ltserve.runtime import Predictor

    pkg = tmp_path / "old"
    shutil.copytree(tiny_package, pkg)
    graph = onnx.load(str(pkg / "model.onnx"))
    stats = FeatureStats.from_text(next(p.value for p in graph.metadata_props if p.key == STATS_KEY))
    embed_stats(pkg / "model.onnx", FeatureStats(centre=stats.centre, means=stats.means, whiten=stats.whiten))
    meta = json.loads((pkg / "model.json").read_text())
    meta["open_set"]["score"] = "mahalanobis"
    meta["files"] = {k: v.model_dump() for k, v in file_entries(pkg, list(meta["files"])).items()}
    (pkg / "model.json").write_text(json.dumps(meta))
    p = Predictor(pkg, threads=1, max_batch_size=4)
    assert p.open_set_mode == "flag" and p.info()["open_set"]["score"] == "mahalanobis"
    assert p.feature_stats.raw_means is None
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (28, 28, 1), dtype=np.uint8) for _ in range(3)]
    logits, features = p.predict_outputs(p.preprocess(images))
    score, _ = p.open_set_scores(logits, features)
    np.testing.assert_allclose(score, _formula("mahalanobis", logits, features, p.feature_stats), rtol=1e-7)
    unknown = ImageSet(labels=np.zeros(3, np.int64), arrays=np.stack([i[..., 0] for i in images]))
    report = open_set_evaluation(p, logits, features, np.zeros(3, np.int64), unknown, "noise", progress=False)
    assert set(report["scores"]) == set(LOGIT_SCORES) | {"ncm_cosine", "mahalanobis"}
    assert report["score"] == "mahalanobis"


def test_export_score_override_and_bad_name(tiny_rebalanced_run, tmp_path):
    from ltserve.cli.export import cli as export_cli
    from ltserve.export import export_package

    meta = export_package(tiny_rebalanced_run, "lws", tmp_path / "pkg", open_set_score="energy", progress=False)
    assert meta.open_set.score == "energy" and "override" in meta.open_set.chosen_by
    with pytest.raises(ConfigError, match=r"not one of msp, energy, max_logit, ncm_cosine, mahalanobis"):
        export_cli([str(tiny_rebalanced_run), "--head", "lws", "--out", str(tmp_path / "bad"),
                    "--open-set-score", "entropy"])
    assert not (tmp_path / "bad").exists()


# -- evaluate and predict ----------------------------------------------------------------------------------------


def _noise_pngs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
        (folder / f"noise{i}.png").write_bytes(buf.getvalue())
    return folder


def test_evaluate_open_set_report(tiny_package, tmp_path):
    from ltserve.evaluate.package import evaluate_package, format_report

    unknown = _noise_pngs(tmp_path / "unknown", 12)
    report, _, _ = evaluate_package(tiny_package, "fashion-mnist:test", limit=100, batch_size=32, threads=1,
                                    progress=False, open_set=str(unknown))
    o = report["open_set"]
    assert o["n_unknown"] == 12 and o["score"] == report["open_set"]["score"]
    assert set(o["scores"]) == set(LOGIT_SCORES) | set(FEATURE_SCORES)
    for key in ("auroc", "aupr", "fpr_at_95_tpr", "f_measure", "unknown_rejected"):
        assert 0.0 <= o[key] <= 1.0
    assert set(o["known_rejected"]) == {"many", "medium", "few", "all"}
    assert set(o["accuracy_accepted"]) == {"many", "medium", "few", "all"}
    assert "open set: 12 unknown images" in format_report(report)


def test_predict_columns(tiny_package, tmp_path):
    from ltserve.batch.job import run_predict
    from ltserve.batch.options import PredictOptions

    images = _noise_pngs(tmp_path / "in", 6)
    out = tmp_path / "preds.csv"
    summary = run_predict(PredictOptions(inputs=[str(images)], model=tiny_package, out=out, workers=0,
                                         batch_size=4, threads=1, progress=False))
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and {"unknown", "ood_score"} <= set(rows[0])
    assert all(r["unknown"] in ("True", "False") and float(r["ood_score"]) == float(r["ood_score"]) for r in rows)
    assert summary["unknown"] == sum(r["unknown"] == "True" for r in rows)
    off = tmp_path / "off.jsonl"
    run_predict(PredictOptions(inputs=[str(images)], model=tiny_package, out=off, workers=0, batch_size=4,
                               threads=1, progress=False, open_set="off"))
    assert all(json.loads(line)["unknown"] is None for line in off.read_text().splitlines())
    with pytest.raises(ConfigError, match="--open-set"):
        run_predict(PredictOptions(inputs=[str(images)], model=tiny_package, out=tmp_path / "x.csv",
                                   open_set="drop"))


def test_held_out_classes(tiny_config):
    from ltserve.data import load_splits
    from ltserve.errors import DataError

    data = tiny_config.data.model_copy(update={"held_out_classes": ["Shirt", "Sneaker"]})
    splits = load_splits(data)
    assert splits.num_classes == 8 and "Shirt" not in splits.class_names
    assert splits.held_out_names == ["Shirt", "Sneaker"] and len(splits.held_out) > 0
    assert set(np.unique(splits.held_out.labels)) == {0, 1}
    for part in (splits.train, splits.val, splits.test):
        assert part.labels.min() >= 0 and part.labels.max() <= 7
    with pytest.raises(DataError, match="not classes"):
        load_splits(tiny_config.data.model_copy(update={"held_out_classes": ["Shirts"]}))
