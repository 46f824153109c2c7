"""Open-set rejection served: LTSERVE_OPEN_SET=flag and reject on a real `bentoml serve` of an exported package
(which records open-set thresholds): every answer carries `unknown` and `ood_score`, the same as the in-process
Predictor's for the same image; in reject mode an unknown image answers `label: null`; unknowns are counted by the
shot group of their top class; /model says which score and mode run; a package without thresholds refuses flag."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from ltserve.runtime import Predictor
from ltserve.serve.process import ServerProcess
from package_helpers import build_lsq_package, read_fashion


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    known, _ = read_fashion("t10k")
    rng = np.random.default_rng(0)
    far = [rng.integers(0, 256, (28, 28), dtype=np.uint8), np.zeros((28, 28), np.uint8),
           np.full((28, 28), 255, np.uint8)]
    return [png(a) for a in [*known[:12], *far]]


@pytest.fixture(scope="module")
def server(tiny_package, tmp_path_factory):
    with ServerProcess({"LTSERVE_MODEL": str(tiny_package), "LTSERVE_OPEN_SET": "reject", "LTSERVE_TOP_K": "3",
                        "BENTOML_DO_NOT_TRACK": "True"}, tmp_path_factory.mktemp("openset") / "server.log") as srv:
        srv.wait_ready()
        yield srv


def top_class(answer: dict) -> int:
    return answer["top_k"][0]["class_index"]


def test_reject_mode_answers_what_the_predictor_decides(server, tiny_package, images):
    """Each answer's decision is its own score against its top class's threshold (model.json), the score is the
    in-process Predictor's for the same image (within float noise: another batch size may round differently), and
    a rejected image answers label null with its closest known classes."""
    predictor = Predictor(tiny_package, threads=1, open_set="reject")
    thresholds = predictor.meta.open_set.thresholds
    expected = [predictor.classify_bytes([im], top_k=3)[0] for im in images]
    answers = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for image in images:
            r = client.post("/classify", files={"image": ("a.png", image, "image/png")})
            assert r.status_code == 200, r.text
            answers.append(r.json())
        batch = client.post("/classify_batch", files=[("images", (f"{i}.png", im, "image/png"))
                                                      for i, im in enumerate(images)])
        info = client.get("/model").json()
        metrics = client.get("/metrics").text
    assert batch.status_code == 200 and len(batch.json()["predictions"]) == len(images)
    for got in [*answers, *batch.json()["predictions"]]:
        assert isinstance(got["unknown"], bool) and isinstance(got["ood_score"], float)
        assert got["unknown"] == (got["ood_score"] > thresholds[top_class(got)]), got
        if got["unknown"]:
            assert got["label"] is None and got["class_index"] is None and got["top_k"], got
        else:
            assert got["label"] == got["top_k"][0]["label"]
    for got, want in zip(answers, expected):
        assert abs(got["ood_score"] - want.ood_score) <= 1e-4 * max(1.0, abs(want.ood_score)), (got, want)
    assert info["open_set"]["mode"] == "reject" and info["open_set"]["score"] == predictor.meta.open_set.score
    unknown = sum(a["unknown"] for a in [*answers, *batch.json()["predictions"]])
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("ltserve_unknown_total{"))
    assert counted == unknown


def test_flag_on_a_package_without_thresholds_stops_startup(tmp_path):
    old = build_lsq_package(tmp_path / "old", n_train=1000)  # written without an open-set section
    srv = ServerProcess({"LTSERVE_MODEL": str(old), "LTSERVE_OPEN_SET": "flag"}, tmp_path / "server.log")
    try:
        with pytest.raises(RuntimeError, match="open-set thresholds"):
            srv.wait_ready(timeout=120)
    finally:
        srv.stop()
