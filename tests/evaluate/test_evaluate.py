"""`ltserve evaluate RUN`: every head side by side, eval/ files, predictions, and the numbers themselves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ltserve.cli.evaluate import cli
from ltserve.errors import RunError
from ltserve.evaluate import evaluate_run, heads_table
from ltserve.features.cache import cached_features
from ltserve.heads import CalibratedHead, load_head, save_head
from ltserve.metrics import classification_report
from ltserve.rundir import RunPaths, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_eval_files_and_matches_a_direct_computation(tiny_run, copy_run, tmp_path):
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    results = evaluate_run(run, "test", predictions=tmp_path / "pred.csv")
    for name in ("test.json", "test.md", "test_per_class.png", "weight_norms.png"):
        assert (paths.eval / name).is_file(), name
    for png in ("test_per_class.png", "weight_norms.png"):
        data = (paths.eval / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000

    info = read_run(run)
    feats, labels = cached_features(run, "test")
    head = load_head(paths.heads, "joint")
    direct = classification_report(head.logits(feats), labels, info.class_counts, info.many_threshold,
                                   info.few_threshold)
    got = results["heads"]["joint"]
    for key in ("top1", "top5", "many", "medium", "few", "balanced_accuracy", "ece", "n"):
        assert got[key] == pytest.approx(direct[key]), key
    assert got["per_class"] == pytest.approx(direct["per_class"])
    assert got["top1"] == pytest.approx(float(np.mean(head.logits(feats).argmax(1) == labels)))
    on_disk = json.loads((paths.eval / "test.json").read_text())
    assert on_disk["heads"]["joint"]["top1"] == pytest.approx(got["top1"])
    assert on_disk["group_sizes"] == {"many": 2, "medium": 3, "few": 5}
    md = (paths.eval / "test.md").read_text()
    assert "| joint |" in md and f"{100 * got['top1']:.1f}" in md and "T-shirt/top" in md

    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == labels.size and set(rows[0]) == {"index", "label", "pred_joint", "prob_joint"}
    preds = np.array([int(r["pred_joint"]) for r in rows])
    np.testing.assert_array_equal(preds, head.logits(feats).argmax(1))
    np.testing.assert_array_equal([int(r["label"]) for r in rows], labels)
    assert all(0.0 < float(r["prob_joint"]) <= 1.0 for r in rows)


def test_every_head_side_by_side_and_jsonl_predictions(tiny_run, copy_run, tmp_path):
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    joint = load_head(paths.heads, "joint")
    norms = np.linalg.norm(joint.weight, axis=1, keepdims=True)
    save_head(CalibratedHead(weight=joint.weight / norms, bias=np.zeros_like(joint.bias), method="tau_norm",
                             meta={"tau": 1.0}), paths.heads)
    results = evaluate_run(run, "val", predictions=tmp_path / "pred.jsonl")
    assert list(results["heads"]) == ["joint", "tau_norm"]
    feats, labels = cached_features(run, "val")
    tau = load_head(paths.heads, "tau_norm")
    assert results["heads"]["tau_norm"]["top1"] == pytest.approx(
        float(np.mean(tau.logits(feats).argmax(1) == labels)))
    lines = (tmp_path / "pred.jsonl").read_text().splitlines()
    assert len(lines) == labels.size
    first = json.loads(lines[0])
    assert set(first) == {"index", "label", "pred_joint", "prob_joint", "pred_tau_norm", "prob_tau_norm"}
    only = evaluate_run(run, "val", heads=["tau_norm"])
    assert list(only["heads"]) == ["tau_norm"]


def test_heads_table_shows_the_ece_before_and_after_calibration_on_val_and_test(tiny_run, copy_run):
    from ltserve.metrics import expected_calibration_error, softmax

    run = copy_run(tiny_run)
    paths = RunPaths(run)
    joint = load_head(paths.heads, "joint")
    save_head(CalibratedHead(weight=joint.weight, bias=joint.bias, method="crt", temperature=2.5), paths.heads)
    for split in ("val", "test"):
        results = evaluate_run(run, split, plots=False)
        feats, labels = cached_features(run, split)
        md = (paths.eval / f"{split}.md").read_text()
        assert "| Balanced | ECE raw | ECE |" in md
        for name in ("joint", "crt"):
            head = load_head(paths.heads, name)
            got = results["heads"][name]
            raw = expected_calibration_error(softmax(head.uncalibrated_logits(feats)), labels)
            cal = expected_calibration_error(softmax(head.logits(feats)), labels)
            assert got["ece_raw"] == pytest.approx(raw, abs=1e-6) and got["ece"] == pytest.approx(cal, abs=1e-6)
            row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
            assert row.endswith(f"| {raw:.3f} | {cal:.3f} |"), row
        assert results["heads"]["crt"]["ece_raw"] != pytest.approx(results["heads"]["crt"]["ece"])
    # a report without the head's temperature has no raw ECE: shown as n/a, not as a number
    assert heads_table({"x": {"top1": 0.5, "ece": 0.1}}).splitlines()[2].endswith("| n/a | 0.100 |")


def test_empty_shot_group_is_reported_as_empty(tiny_run, copy_run):
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    raw = json.loads(paths.run_json.read_text())
    raw["many_threshold"] = 10_000  # no class has more than 10,000 images: many-shot is empty
    paths.run_json.write_text(json.dumps(raw))
    results = evaluate_run(run, "test")
    assert results["heads"]["joint"]["many"] is None and results["group_sizes"]["many"] == 0
    assert "| joint | empty |" in (paths.eval / "test.md").read_text()
    assert "| joint | empty |" in heads_table(results["heads"])


def test_cli_prints_the_table(tiny_run, copy_run, capsys):
    run = copy_run(tiny_run)
    assert cli([str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "| head | Many | Medium | Few | All |" in out and "| joint |" in out
    assert (RunPaths(run).eval / "val.json").is_file()


def test_unknown_head_lists_the_available_ones(tiny_run, copy_run):
    with pytest.raises(RunError, match="available: joint"):
        evaluate_run(copy_run(tiny_run), "val", heads=["crt"])


def test_stage2_figures_come_from_the_head_files_and_no_plots_skips_every_png(tiny_run, copy_run):
    """The sweep and joint-vs-best figures are drawn from what the heads recorded (no stage-2 code involved), the
    best head by the one rule (val); `plots=False` writes the tables only."""
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    joint = load_head(paths.heads, "joint")
    norms = np.linalg.norm(joint.weight, axis=1, keepdims=True)
    sweep = [{"tau": t, "score": 0.5, "top1": 0.5, "many": 0.6, "medium": 0.5, "few": 0.4} for t in (0.0, 0.5, 1.0)]
    save_head(CalibratedHead(weight=joint.weight / norms, bias=np.zeros_like(joint.bias), method="tau_norm",
                             meta={"tau": 1.0, "sweep": sweep, "val": {"balanced_accuracy": 0.99, "top1": 0.99}}),
              paths.heads)
    results = evaluate_run(run, "val")
    assert {"sweep_tau_norm_png", "joint_vs_best_png"} <= set(results["files"])
    for key in ("sweep_tau_norm_png", "joint_vs_best_png"):
        assert Path(results["files"][key]).read_bytes().startswith(PNG_MAGIC)
    for png in paths.eval.glob("*.png"):
        png.unlink()
    bare = evaluate_run(run, "val", plots=False)
    assert set(bare["files"]) == {"json", "markdown"} and not list(paths.eval.glob("*.png"))
    assert (paths.eval / "val.md").is_file()


def test_reliability_diagram_and_confusion_matrix_are_drawn_and_their_numbers_are_in_the_json(tiny_run, copy_run):
    """Every evaluation draws a reliability diagram (ECE per head) and the row-normalised confusion matrix of joint
    and the best head by val, classes head to tail; the JSON names the PNGs and holds the numbers they show."""
    from ltserve.metrics import softmax

    run = copy_run(tiny_run)
    paths = RunPaths(run)
    joint = load_head(paths.heads, "joint")
    norms = np.linalg.norm(joint.weight, axis=1, keepdims=True)
    save_head(CalibratedHead(weight=joint.weight / norms, bias=np.zeros_like(joint.bias), method="tau_norm",
                             meta={"tau": 1.0, "val": {"balanced_accuracy": 0.99, "top1": 0.99}}), paths.heads)
    results = evaluate_run(run, "test")
    on_disk = json.loads((paths.eval / "test.json").read_text())
    for key, name in (("reliability_png", "test_reliability.png"), ("confusion_png", "test_confusion.png")):
        assert on_disk["files"][key] == str(paths.eval / name)
        data = (paths.eval / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    info = read_run(run)
    feats, labels = cached_features(run, "test")
    order = np.argsort(-np.asarray(info.class_counts), kind="stable")
    assert list(on_disk["reliability"]) == ["joint", "tau_norm"]
    assert list(on_disk["confusion"]) == ["joint", "tau_norm"]  # tau_norm is the best head by val here
    for name in ("joint", "tau_norm"):
        curve = on_disk["reliability"][name]
        assert sum(curve["count"]) == labels.size == curve["n"] and len(curve["edges"]) == len(curve["count"]) + 1
        assert curve["ece"] == pytest.approx(results["heads"][name]["ece"], abs=1e-9)  # the reports' ECE
        for c, a, k, lo, hi in zip(curve["confidence"], curve["accuracy"], curve["count"], curve["edges"],
                                   curve["edges"][1:]):
            assert (c is None) == (k == 0) and (k == 0 or (lo < c <= hi and 0.0 <= a <= 1.0))
        entry = on_disk["confusion"][name]
        assert entry["order"] == order.tolist() and entry["class_names"] == [info.class_names[j] for j in order]
        counts = [info.class_counts[j] for j in entry["order"]]
        assert counts == sorted(counts, reverse=True)  # head to tail
        matrix = np.asarray(entry["matrix"], dtype=np.float64)
        assert matrix.shape == (10, 10) and (matrix >= 0).all()
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-9)
        np.testing.assert_array_equal(entry["row_totals"], np.bincount(labels, minlength=10)[order])
        # the diagonal is each class's recall, the report's per-class accuracy
        np.testing.assert_allclose(np.diag(matrix), np.asarray(results["heads"][name]["per_class"])[order])
        pred = load_head(paths.heads, name).logits(feats).argmax(1)
        i, j = 0, 1  # an off-diagonal entry counted directly: true order[0] predicted as order[1]
        share = np.mean(pred[labels == order[i]] == order[j])
        assert matrix[i, j] == pytest.approx(share)
        # the last bin holds the images the head is most sure of: counted directly from its served probabilities
        top = softmax(load_head(paths.heads, name).logits(feats)).max(axis=1)
        assert curve["count"][-1] == int(np.sum(top > curve["edges"][-2]))


def test_diagnostics_numbers_on_hand_made_predictions():
    """The confusion rows count what they should (an imageless class gives an empty row, not a row of zeros that
    claims to sum to 1); past 100 classes the JSON keeps totals and recall only; the reliability bins sum to the
    reports' ECE."""
    from ltserve.evaluate.diagnostics import (CONFUSION_JSON_MAX_CLASSES, confusion_entry, confusion_matrix,
                                              reliability_curve)
    from ltserve.metrics import expected_calibration_error, softmax

    labels = np.array([0, 0, 0, 0, 2, 2])
    pred = np.array([0, 0, 2, 1, 0, 2])
    order = [2, 0, 1]  # class 1 has no image
    matrix, totals = confusion_matrix(pred, labels, order)
    np.testing.assert_allclose(matrix[:2], [[0.5, 0.5, 0.0], [0.25, 0.5, 0.25]])
    assert np.isnan(matrix[2]).all() and totals.tolist() == [2, 4, 0]
    entry = confusion_entry(matrix, totals, order, ["a", "b", "c"])
    assert entry["class_names"] == ["c", "a", "b"] and entry["recall"] == [0.5, 0.5, None]
    assert entry["matrix"][2] is None and entry["matrix"][1] == [0.25, 0.5, 0.25]
    big = CONFUSION_JSON_MAX_CLASSES + 1
    m, t = confusion_matrix(np.arange(big), np.arange(big), range(big))
    wide = confusion_entry(m, t, range(big), [str(j) for j in range(big)])
    assert "matrix" not in wide and wide["recall"] == [1.0] * big

    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(0, 2, size=(500, 7)))
    y = rng.integers(0, 7, size=500)
    curve = reliability_curve(probs, y)
    assert curve["ece"] == pytest.approx(expected_calibration_error(probs, y), abs=1e-12)
    assert sum(curve["count"]) == 500 and curve["count"][0] == 0  # no confidence can be below 1/7
