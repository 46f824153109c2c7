"""Live label shift through real `bentoml serve` processes: two workers on the committed package models/fashion-lt,
LTSERVE_PRIOR_ADAPT=apply, one state folder kept across three server starts (restart, reset, corrupt state).

Traffic: Fashion-MNIST test PNGs drawn with the reversed training prior (Ankle boot 40 %, ..., T-shirt 0.4 %), sent
to /classify_batch; the true mix is known, and the answers' accuracy is compared with the package's own unadapted
predictions (the Predictor, in this process).
"""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ltserve.package import read_model_json
from ltserve.runtime import Predictor
from ltserve.runtime.prior import tv_distance
from ltserve.serve.process import ServerProcess
from package_helpers import read_fashion

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "fashion-lt"
PREDICTION_FIELDS = {"label", "class_index", "probability", "shot_group", "top_k", "unknown", "ood_score"}


def skewed(labels: np.ndarray, pi: np.ndarray, n: int, rng: np.random.Generator, exclude=()) -> np.ndarray:
    counts = np.floor(pi * n).astype(int)
    counts[np.argsort(-(pi * n - counts))[:n - counts.sum()]] += 1
    pool = np.setdiff1d(np.arange(len(labels)), np.asarray(exclude, dtype=int))
    idx = np.concatenate([rng.choice(pool[labels[pool] == j], k, replace=False) for j, k in enumerate(counts)])
    rng.shuffle(idx)
    return idx


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data():
    images, labels = read_fashion("t10k")
    meta = read_model_json(DEMO)
    counts = np.asarray(meta.class_counts, dtype=np.float64)
    truth = (counts / counts.sum())[::-1].copy()
    rng = np.random.default_rng(0)
    learn = skewed(labels, truth, 800, rng)
    evaluate = skewed(labels, truth, 600, rng, exclude=learn)
    return {"images": images, "labels": labels, "truth": truth, "learn": learn, "evaluate": evaluate,
            "meta": meta}


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prior-state")


def start(state: Path, log: Path, method: str | None = "em") -> ServerProcess:
    """A server on the committed package; method None leaves LTSERVE_PRIOR_METHOD unset (the default, auto)."""
    env = {"LTSERVE_MODEL": str(DEMO), "LTSERVE_PRIOR_ADAPT": "apply", "LTSERVE_PRIOR_STATE_DIR": str(state),
           **({"LTSERVE_PRIOR_METHOD": method} if method is not None else {}),
           "LTSERVE_PRIOR_MIN_SAMPLES": "100", "LTSERVE_PRIOR_PERSIST_S": "0.2", "LTSERVE_THREADS": "1",
           "OMP_NUM_THREADS": "1", "BENTOML_CONFIG_OPTIONS": "services.ltserve.workers=2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    srv = ServerProcess(env, log, cwd=REPO)
    try:
        srv.wait_ready()
        # /readyz answers once one worker is up; the tests need both (each owns a state file), and on a loaded
        # machine the second may still be starting: wait for BentoML's line of each worker
        wait_for_log(srv, *(f"[entry_service:ltserve:{i}] Service ltserve initialized" for i in (1, 2)))
    except BaseException:
        srv.stop()
        raise
    return srv


def classify(srv: ServerProcess, images: np.ndarray, per_request: int = 50) -> list[dict]:
    """/classify_batch answers in order; requests run 4 at a time, each on a new connection, so that both workers
    (which accept from one socket) serve some."""
    def one(chunk: np.ndarray) -> list[dict]:
        files = [("images", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(chunk)]
        r = httpx.post(srv.url + "/classify_batch", files=files, timeout=60)
        assert r.status_code == 200, r.text[:500]
        return r.json()["predictions"]

    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(one, [images[s:s + per_request] for s in range(0, len(images), per_request)]))
    return [p for part in parts for p in part]


def prior(srv: ServerProcess, times: int = 6) -> list[dict]:
    """GET /prior a few times, each on a new connection (both workers answer, each with its merged view)."""
    return [httpx.get(srv.url + "/prior", timeout=30).json() for _ in range(times)]


def estimate(report: dict) -> np.ndarray:
    return np.array([c["estimate"] for c in report["classes"]])


def settled(srv: ServerProcess, done, timeout: float = 60.0) -> list[dict]:
    """GET /prior (as `prior`) until every answer is `done`: the workers write their state files from a background
    thread (every LTSERVE_PRIOR_PERSIST_S, later on a loaded machine), so each worker sees the other's images only
    some time after they were answered. Returns the last answers (the caller asserts on them)."""
    deadline = time.monotonic() + timeout
    while True:
        reps = prior(srv)
        if all(done(r) for r in reps) or time.monotonic() > deadline:
            return reps
        time.sleep(0.2)


def wait_for_log(srv: ServerProcess, *parts: str, timeout: float = 60.0) -> str:
    """The server's log once it holds every one of `parts` (a worker logs at its own start, in any order with the
    other workers and the first answers), or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        text = srv.log.read_text(errors="replace")
        if all(p in text for p in parts) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_live_prior_follows_a_skewed_stream_adapts_survives_a_restart_and_resets(data, state, tmp_path):
    images, labels = data["images"], data["labels"]
    srv = start(state, tmp_path / "first.log")
    try:
        # no traffic yet: the target prior, nothing estimated, nothing adapted
        for rep in prior(srv, 2):
            assert rep["n"] == 0 and not rep["estimated"] and not rep["adapting"]
            assert np.allclose(estimate(rep), 0.1) and rep["distance"]["total_variation"] == 0
        learn = classify(srv, images[data["learn"]])
        assert all(PREDICTION_FIELDS | {"adapted"} == set(p) for p in learn)
        reps = settled(srv, lambda r: r["n"] == 800)  # both workers have written their windows
        assert sorted(p.name for p in state.glob("worker-*.npz")) == ["worker-1.npz", "worker-2.npz"]
        for rep in reps:  # every worker sees the server's 800 images, each once
            assert rep["n"] == 800 and rep["workers"] == 2 and rep["estimated"] and rep["adapting"]
            assert tv_distance(estimate(rep), data["truth"]) < 0.1 < tv_distance(np.full(10, 0.1), data["truth"])
            assert rep["distance"]["total_variation"] > 0.3 and rep["expected_tv_error"] < 0.1
            assert sum(c["predicted"] for c in rep["classes"]) == 800
        # apply: fresh images of the same mix are answered adapted, and more of them right
        answers = classify(srv, images[data["evaluate"]])
        assert all(a["adapted"] is True for a in answers)
        y = labels[data["evaluate"]]
        adapted = np.mean([a["class_index"] for a in answers] == y)
        predictor = Predictor(DEMO, threads=1)
        plain = np.mean(predictor.predict(predictor.preprocess(list(images[data["evaluate"]][..., None])))
                        .argmax(1) == y)
        assert adapted > plain + 0.01, (adapted, plain)
        before = estimate(settled(srv, lambda r: r["n"] == 1400)[0])
        with httpx.Client(base_url=srv.url) as client:
            metrics = client.get("/metrics").text
        assert 'ltserve_prior_estimate{label="Ankle boot"}' in metrics and "ltserve_prior_distance" in metrics
        assert "ltserve_prior_adapted_total" in metrics
    finally:
        srv.stop()  # SIGTERM: every worker writes its state on shutdown

    srv = start(state, tmp_path / "second.log")
    try:
        for rep in prior(srv):  # the restarted server has the estimate it had
            assert rep["n"] == 1400 and rep["estimated"]
            assert tv_distance(estimate(rep), before) < 0.005
        reset = httpx.post(srv.url + "/prior/reset", timeout=30).json()
        assert reset["n"] == 0 and not reset["estimated"] and np.allclose(estimate(reset), 0.1)
        time.sleep(1.5)  # the other worker applies the reset marker within a second
        one = httpx.post(srv.url + "/classify", files={"image": ("x.png", png(images[0]), "image/png")}).json()
        assert one["adapted"] is False and PREDICTION_FIELDS < set(one)
        for rep in prior(srv):
            assert rep["n"] <= 1 and not rep["estimated"] and rep["reset_at"]
    finally:
        srv.stop()


def test_corrupt_state_is_moved_aside_and_the_server_starts_from_the_target_prior(data, state, tmp_path):
    """The third start leaves LTSERVE_PRIOR_METHOD unset: auto, which picks bbse on the committed package (it records
    a usable val confusion matrix), and GET /prior and GET /model say so (the first two starts set em explicitly; an
    older model.json resolves to em and refuses an explicit bbse, and the start-up log line: see the test below)."""
    worker1 = state / "worker-1.npz"
    garbage = b"PK\x03\x04 this is not a state file" * 10
    worker1.write_bytes(garbage)
    log = tmp_path / "third.log"
    srv = start(state, log, method=None)
    try:
        for rep in prior(srv):
            assert not rep["estimated"] and rep["n"] <= 1 and rep["method"] == "bbse"
            assert rep["method_setting"] == "auto" and "LTSERVE_PRIOR_METHOD=auto: bbse" in rep["method_reason"]
        service = httpx.get(srv.url + "/model", timeout=30).json()["service"]
        assert service["prior_method"] == "bbse" and service["prior_method_setting"] == "auto"
        assert "condition number" in service["prior_method_reason"]
        # worker 1 logs it when it starts, which may be after worker 2 answers the first requests
        text = wait_for_log(srv, "live prior state unusable", "moved to worker-1.npz.corrupt-",
                            "live prior (apply): estimator bbse", "serving fashion-lt from")
        assert "live prior state unusable" in text and "moved to worker-1.npz.corrupt-" in text, text[-3000:]
        # what a worker says once at start (INFO) reaches the server's log, past BentoML's WARNING root level
        assert "live prior (apply): estimator bbse" in text and "serving fashion-lt from" in text, text[-3000:]
        aside = list(state.glob("worker-1.npz.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == garbage  # nothing lost
        # one class only (Trouser), every other class never predicted: a finite estimate, a capped shift
        images, labels = data["images"], data["labels"]
        trousers = np.flatnonzero(labels == 1)[:300]
        answers = classify(srv, images[trousers])
        assert sum(a["class_index"] == 1 for a in answers) > 280
        for rep in settled(srv, lambda r: r["n"] >= 300):  # both workers' trousers merged
            est = estimate(rep)
            assert rep["estimated"] and rep["method"] == "bbse" and est[1] > 0.8 and np.isfinite(est).all() and (est > 0).all()
            assert any(c["predicted"] == 0 for c in rep["classes"])
            shift = np.array([c["shift"] for c in rep["classes"]])
            assert np.abs(shift).max() <= rep["settings"]["max_shift"] + 1e-6 and shift.argmax() == 1
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------------------
# LivePrior in process: two instances on one folder are two workers of one server
# ---------------------------------------------------------------------------------------------------------------------


def test_two_workers_merge_by_time_persist_reset_and_skip_a_bad_file(data, tmp_path):
    from ltserve.runtime.prior import EstimatorSettings
    from ltserve.serve.live_prior import LivePrior

    meta = data["meta"]
    predictor = Predictor(DEMO, threads=1)
    logits = predictor.predict(predictor.preprocess(list(data["images"][data["learn"]][..., None])))
    settings = EstimatorSettings(window=500, min_samples=100)
    a = LivePrior(meta, settings, "apply", tmp_path, "1", persist_s=60)
    b = LivePrior(meta, settings, "apply", tmp_path, "2", persist_s=60)
    try:
        for s in range(0, 600, 50):  # alternate the workers, 50 images per request
            (a if (s // 50) % 2 == 0 else b).adapt(logits[s:s + 50])
        a.close(), b.close()  # written (the background thread would, every persist_s)
        rep = a.report()
        assert rep["n"] == 500 and rep["workers"] == 2  # the newest 500 of 600, whichever worker saw them
        assert tv_distance(estimate(rep), data["truth"]) < 0.1
        _, adapted = a.adapt(logits[600:650])
        assert adapted  # apply: past the floor, far outside the dead band
        # a restarted worker 1 loads its own file: same images, same estimate
        a2 = LivePrior(meta, settings, "apply", tmp_path, "1", persist_s=60)
        assert a2.report()["n"] == 500
        # a reset by worker 2 reaches worker 1 through the marker file
        b2 = LivePrior(meta, settings, "apply", tmp_path, "2", persist_s=60)
        assert b2.reset()["n"] == 0
        time.sleep(1.1)  # worker 1 looks at the marker at most once a second
        out, adapted = a2.adapt(logits[:1])
        assert a2.report()["n"] <= 1 and not a2.report()["estimated"] and np.array_equal(out, logits[:1])
        # another worker's unreadable file is skipped (with a warning), never fatal
        (tmp_path / "worker-3.npz").write_bytes(b"garbage")
        assert a2.report()["workers"] == 3 and a2.report()["n"] <= 1
        a2.close(), b2.close()
    finally:
        for w in (a, b):
            w.close()


def test_live_prior_settings_off_and_bbse_on_an_old_package(data, tmp_path, caplog):
    import logging

    from ltserve.errors import ConfigError
    from ltserve.serve.live_prior import default_state_dir, live_prior_from_settings
    from ltserve.serve.settings import ServiceSettings

    meta = data["meta"]
    assert live_prior_from_settings(ServiceSettings.from_env(prior_adapt="off"), meta, "1") is None
    old = meta.model_copy(update={"label_shift": None})  # a model.json from before export recorded label shift
    with pytest.raises(ConfigError, match="LTSERVE_PRIOR_METHOD=bbse needs the val confusion matrix.*=em"):
        live_prior_from_settings(ServiceSettings.from_env(prior_method="bbse", prior_state_dir=tmp_path), old, "1")
    with caplog.at_level(logging.INFO, logger="ltserve.serve.live_prior"):
        auto_old = live_prior_from_settings(ServiceSettings.from_env(prior_state_dir=tmp_path / "o"), old, "1")
    assert "live prior (report): estimator em; LTSERVE_PRIOR_METHOD=auto: em, because" in caplog.text
    try:  # the default, auto, falls back to em there
        rep = auto_old.report()
        assert rep["method"] == "em" and rep["method_setting"] == "auto" and "no val confusion" in rep["method_reason"]
        assert auto_old.model_info()["prior_method"] == "em"
    finally:
        auto_old.close()
    bbse = live_prior_from_settings(ServiceSettings.from_env(prior_method="bbse", prior_state_dir=tmp_path / "b"),
                                    meta, "1")  # the committed package records it
    try:
        assert bbse.report()["method"] == "bbse" and bbse.report()["method_setting"] == "bbse"
    finally:
        bbse.close()
    assert default_state_dir(meta).name == f"fashion-lt-{meta.files['model.onnx'].sha256[:12]}"
    prior = live_prior_from_settings(ServiceSettings.from_env(prior_state_dir=tmp_path / "s"), meta, "1")
    try:
        assert prior.mode == "report" and prior.state_dir == tmp_path / "s"
        assert ServiceSettings.from_env().prior_method == "auto"  # the default: bbse on the committed package
        assert prior.model_info()["prior_method"] == "bbse" and prior.report()["method_setting"] == "auto"
        _, adapted = prior.adapt(np.zeros((300, 10), np.float32))
        assert adapted is False  # report never adapts
    finally:
        prior.close()
