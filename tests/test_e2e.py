"""The newcomer path end to end, through the command line only (every step a subprocess, as a user types it):

    ltserve train -> ltserve rebalance -> ltserve export -> ltserve inspect -> bentoml serve + HTTP
    -> ltserve predict (a folder) -> ltserve evaluate (the package, per-image predictions)

on configs/tiny.yaml cut to 3 epochs (agreement needs no accuracy). The three consumers of the package must agree
image by image: the same label everywhere, HTTP and batch probabilities of every class within 1e-5, and the package
evaluation's probability of its prediction within 1e-5 of theirs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ltserve.serve.process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "configs" / "tiny.yaml"
N_IMAGES = 24
NUM_CLASSES = 10  # Fashion-MNIST; top-k = all classes so every probability is compared
TOL = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("bentoml_home")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LTSERVE_")}
    return {**clean, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "BENTOML_HOME": str(home),
            "BENTOML_DO_NOT_TRACK": "True"}


def sh(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run one command line; fail the test with its output when it exits non-zero. Returns stdout."""
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (f"`{' '.join(args)}` exited {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n"
                                 f"--- stderr\n{out.stderr[-3000:]}")
    return out.stdout


def probabilities(prediction: dict) -> dict[int, float]:
    """class index -> probability, from a Prediction's top-k."""
    return {e["class_index"]: e["probability"] for e in prediction["top_k"]}


def test_train_rebalance_export_serve_predict_evaluate_agree(tmp_path, env):
    work = tmp_path
    # --- build: stage 1, stage 2, fold + export, verify the package
    sh(["ltserve", "train", str(TINY), "--out", "runs/e2e", "--set", "train.epochs=3", "--no-eval"], work, env)
    sh(["ltserve", "rebalance", "runs/e2e", "--heads", "all", "--no-progress"], work, env)
    sh(["ltserve", "export", "runs/e2e", "--head", "best", "--out", "models/e2e"], work, env)
    inspected = sh(["ltserve", "inspect", "models/e2e"], work, env)
    assert "OK:" in inspected
    model = json.loads((work / "models" / "e2e" / "model.json").read_text())
    assert len(model["labels"]) == NUM_CLASSES

    # --- the same images for everyone: a folder of PNGs, and their list (kept outside the folder: `predict` on a
    # folder reports every non-image file as a failure)
    sh([sys.executable, "-m", "ltserve.data", "samples", "images", "--count", str(N_IMAGES)], work, env)
    (work / "images" / "labels.txt").rename(work / "labels.txt")
    names = [line.split()[0] for line in (work / "labels.txt").read_text().splitlines()]
    assert len(names) == N_IMAGES

    # --- HTTP: one /classify per image, and one /classify_batch of all of them
    server = ServerProcess({**env, "LTSERVE_MODEL": "models/e2e", "LTSERVE_TOP_K": str(NUM_CLASSES)},
                           tmp_path / "serve.log", cwd=work, inherit_env=False)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            http = {}
            for name in names:
                r = client.post("/classify", files={"image": (name, (work / "images" / name).read_bytes(),
                                                              "image/png")})
                assert r.status_code == 200, r.text
                http[name] = r.json()
            r = client.post("/classify_batch", files=[("images", (n, (work / "images" / n).read_bytes(), "image/png"))
                                                      for n in names])
            assert r.status_code == 200, r.text
            batch_http = r.json()["predictions"]
            served = client.get("/model").json()
    finally:
        server.stop()
    assert server.proc.returncode is not None
    assert served["labels"] == model["labels"] and served["head"]["name"] == model["head"]["name"]

    # --- offline batch over the folder
    sh(["ltserve", "predict", "models/e2e", "images/", "--out", "preds.jsonl", "--top-k",
        str(NUM_CLASSES), "--no-progress"], work, env)
    rows = {Path(row["path"]).name: row for row in map(json.loads, (work / "preds.jsonl").read_text().splitlines())}
    assert sorted(rows) == sorted(names)

    # --- the package evaluated on the list, with per-image predictions
    sh(["ltserve", "evaluate", "models/e2e", "--data", "labels.txt", "--root", "images", "--json", "eval.json",
        "--predictions", "eval.csv"], work, env)
    report = json.loads((work / "eval.json").read_text())
    assert report["n"] == N_IMAGES
    with open(work / "eval.csv", newline="") as fh:
        evaluated = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in evaluated] == list(range(N_IMAGES))

    # --- agreement, image by image
    for name, ev, in_batch in zip(names, evaluated, batch_http):
        one, row = http[name], rows[name]
        assert one["class_index"] == row["class_index"] == in_batch["class_index"] == int(ev["pred"]), name
        assert one["label"] == row["label"] == ev["pred_name"] == model["labels"][one["class_index"]], name
        p_http, p_batch, p_in_batch = probabilities(one), probabilities(row), probabilities(in_batch)
        assert set(p_http) == set(p_batch) == set(range(NUM_CLASSES)), name
        for j in range(NUM_CLASSES):
            assert abs(p_http[j] - p_batch[j]) <= TOL, (name, j, p_http[j], p_batch[j])
            assert abs(p_http[j] - p_in_batch[j]) <= TOL, (name, j, p_http[j], p_in_batch[j])
        assert abs(float(ev["probability"]) - row["probability"]) <= TOL, (name, ev["probability"], row)
    # the report's top-1 is the agreement's accuracy: the labels it scored are the list's
    truth = [int(line.split()[1]) for line in (work / "labels.txt").read_text().splitlines()]
    top1 = sum(rows[n]["class_index"] == t for n, t in zip(names, truth)) / N_IMAGES
    assert abs(report["top1"] - top1) < 1e-9
