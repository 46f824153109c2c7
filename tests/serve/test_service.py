"""The BentoML service through a real `bentoml serve` on 127.0.0.1, with real clients (curl, httpx, SyncHTTPClient).

One server per module, on the least-squares Fashion-MNIST package, configured through LTSERVE_CONFIG (YAML) plus
environment variables: an API key, CORS for one origin, small upload / pixel / batch caps so the limits are cheap
to hit.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ltserve.errors import ConfigError
from ltserve.runtime import Predictor
from ltserve.serve.process import ServerProcess, free_port
from package_helpers import build_lsq_package, read_fashion

REPO = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).parent / "bentoml")
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_UPLOAD = 1_500_000
MAX_PIXELS = 1_000_000
MAX_BATCH_IMAGES = 4
ORIGIN = "http://app.example.org"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_lsq_package(tmp_path_factory.mktemp("models") / "fashion-lsq")


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "ltserve.yaml"
    # inline_model_ms 0: every batch through the model thread, so concurrent requests batch whatever this machine's
    # warm-up timings are (a tiny model would otherwise run on the event loop, one request at a time)
    config.write_text(f"top_k: 3\nmax_batch_images: {MAX_BATCH_IMAGES}\nmax_latency_ms: 10\nmax_batch_size: 16\n"
                      "decode_threads: 3\ninline_model_ms: 0\n")
    env = {"LTSERVE_MODEL": str(package), "LTSERVE_CONFIG": str(config), "LTSERVE_API_KEY": API_KEY,
           "LTSERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "LTSERVE_MAX_PIXELS": str(MAX_PIXELS),
           "LTSERVE_CORS_ORIGINS": ORIGIN, "LTSERVE_THREADS": "2", "OMP_NUM_THREADS": "2"}
    with ServerProcess(env, tmp / "serve.log", target=None, cwd=REPO) as srv:  # plain `bentoml serve` (bentofile.yaml)
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def predictor(package) -> Predictor:
    return Predictor(package, threads=1, max_batch_size=16)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Real images as files: Fashion-MNIST test PNGs, scikit-learn's china.jpg, scikit-image's astronaut."""
    import sklearn.datasets
    import skimage.data

    tmp = tmp_path_factory.mktemp("images")
    fm, _ = read_fashion("t10k")
    out = {}
    for i in range(6):
        out[f"fashion_{i}"] = tmp / f"fashion_{i}.png"
        Image.fromarray(fm[i]).save(out[f"fashion_{i}"])
    out["china"] = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    assert out["china"].is_file()
    out["astronaut"] = tmp / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(out["astronaut"])
    return out


def assert_same(pred: dict, expected, tol: float = 1e-5) -> None:
    assert pred["label"] == expected.label and pred["class_index"] == expected.class_index
    assert pred["shot_group"] == expected.shot_group
    assert abs(pred["probability"] - expected.probability) <= tol
    assert [e["label"] for e in pred["top_k"]] == [e.label for e in expected.top_k]
    for got, want in zip(pred["top_k"], expected.top_k):
        assert abs(got["probability"] - want.probability) <= tol


def assert_error(resp: httpx.Response, status: int, error: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if error is not None:
        assert body["error"] == error, body
    return body


# -- settings (no server) --------------------------------------------------------------------------------------------


@pytest.fixture()
def clean_env(monkeypatch):
    """No LTSERVE_* variable of this process reaches the settings (set them with monkeypatch.setenv)."""
    for name in list(os.environ):
        if name.upper().startswith("LTSERVE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_from_env_and_yaml(tmp_path, clean_env):
    from ltserve.serve.settings import ServiceSettings

    s = ServiceSettings.from_env()
    assert s.model == Path("models/fashion-lt") and s.api_key is None and s.cors_origins == []
    assert s.model_path() == (Path.cwd() / "models/fashion-lt").resolve()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("top_k: 2\nproviders: [cuda, cpu]\nmax_latency_ms: 3\n")
    for name, value in {"LTSERVE_CONFIG": str(cfg), "LTSERVE_TOP_K": "7", "LTSERVE_CORS_ORIGINS": "a, b",
                        "LTSERVE_API_KEY": "s3cr3t-value"}.items():
        clean_env.setenv(name, value)
    s = ServiceSettings.from_env()
    assert s.top_k == 7 and s.providers == ["cuda", "cpu"] and s.max_latency_ms == 3
    assert s.cors_origins == ["a", "b"] and s.api_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(s)
    clean_env.setenv("LTSERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match="LTSERVE_MAX_BATCH_SIZE"):
        ServiceSettings.from_env()
    clean_env.delenv("LTSERVE_MAX_BATCH_SIZE")
    cfg.write_text("top_kk: 2\n")
    with pytest.raises(ConfigError, match="top_kk"):
        ServiceSettings.from_env()
    clean_env.setenv("LTSERVE_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        ServiceSettings.from_env()


# one valid, non-default value per settings field, as an environment variable would carry it, and as parsed
FIELD_VALUES = {
    "model": ("models/other", Path("models/other")), "top_k": ("3", 3), "max_upload_bytes": ("2048", 2048),
    "max_pixels": ("1000", 1000), "max_request_pixels": ("5000", 5000), "max_batch_images": ("8", 8),
    "timeout_s": ("2.5", 2.5), "receive_timeout_s": ("4", 4.0), "max_connections": ("10", 10),
    "providers": ("cuda,cpu", ["cuda", "cpu"]), "backend": ("torch", "torch"), "torch_device": ("cpu", "cpu"),
    "torch_precision": ("fp32", "fp32"), "torch_cuda_graphs": ("0", False),
    "torch_device_preprocess": ("1", True), "workers": ("3", 3), "threads": ("3", 3),
    "max_batch_size": ("4", 4), "max_latency_ms": ("7", 7.0), "decode_threads": ("2", 2),
    "api_key": ("k3y", "k3y"), "cors_origins": ("http://a.example, http://b.example",
                                                ["http://a.example", "http://b.example"]),
    "metrics_dir": ("/tmp/ltserve-test-metrics", Path("/tmp/ltserve-test-metrics")),
    "open_set": ("reject", "reject"), "inline_model_ms": ("0", 0.0),
    "prior_adapt": ("apply", "apply"), "prior_method": ("bbse", "bbse"), "prior_window": ("500", 500),
    "prior_half_life": ("300", 300.0), "prior_min_samples": ("50", 50), "prior_max_shift": ("2", 2.0),
    "prior_dead_band": ("0.1", 0.1), "prior_state_dir": ("/tmp/prior-x", Path("/tmp/prior-x")),
    "prior_persist_s": ("1", 1.0),
}


def test_every_setting_is_an_ltserve_variable_and_the_environment_wins_over_yaml(tmp_path, clean_env):
    from ltserve.serve.settings import ServiceSettings

    assert set(ServiceSettings.model_fields) == set(FIELD_VALUES) | {"config"}, "a new setting needs a value here"
    defaults = ServiceSettings.from_env()
    for field, (raw, parsed) in FIELD_VALUES.items():
        clean_env.setenv(f"LTSERVE_{field.upper()}", raw)
        got = getattr(ServiceSettings.from_env(), field)
        got = got.get_secret_value() if field == "api_key" else got
        assert got == parsed != getattr(defaults, field), field
        clean_env.delenv(f"LTSERVE_{field.upper()}")

    # the YAML file (LTSERVE_CONFIG) takes every field but `config`; a variable wins over the same key there
    cfg = tmp_path / "all.yaml"
    cfg.write_text("".join(f"{field}: {raw!r}\n" for field, (raw, _) in FIELD_VALUES.items()))
    clean_env.setenv("LTSERVE_CONFIG", str(cfg))
    s = ServiceSettings.from_env()
    assert s.config == cfg and s.top_k == 3 and s.providers == ["cuda", "cpu"] and s.torch_cuda_graphs is False
    clean_env.setenv("LTSERVE_TOP_K", "9")
    clean_env.setenv("LTSERVE_PROVIDERS", "cpu")
    clean_env.setenv("LTSERVE_TORCH_CUDA_GRAPHS", "")  # empty = unset: the file's value stays
    s = ServiceSettings.from_env()
    assert s.top_k == 9 and s.providers == ["cpu"] and s.max_batch_size == 4 and s.torch_cuda_graphs is False
    assert ServiceSettings.from_env(top_k=11).top_k == 11  # keyword arguments win over both


def test_invalid_settings_name_the_variable_and_unknown_yaml_keys_list_the_valid_ones(tmp_path, clean_env):
    from ltserve.serve.settings import ServiceSettings

    for field, raw, problem in [("top_k", "many", "valid integer"), ("top_k", "0", "greater than or equal to 1"),
                                ("backend", "tensorflow", "'onnxruntime' or 'torch'"),
                                ("torch_precision", "fp8", "'auto', 'fp32' or 'fp16'"),
                                ("torch_cuda_graphs", "maybe", "valid boolean"),
                                ("max_latency_ms", "-1", "greater than or equal to 0")]:
        clean_env.setenv(f"LTSERVE_{field.upper()}", raw)
        with pytest.raises(ConfigError) as err:
            ServiceSettings.from_env()
        assert f"LTSERVE_{field.upper()}" in str(err.value) and problem in str(err.value), str(err.value)
        assert "environment" in str(err.value)
        clean_env.delenv(f"LTSERVE_{field.upper()}")
    clean_env.setenv("LTSERVE_API_KEY", "x")  # a secret's value is never echoed
    cfg = tmp_path / "c.yaml"
    clean_env.setenv("LTSERVE_CONFIG", str(cfg))
    cfg.write_text("top_k: -3\n")
    with pytest.raises(ConfigError, match=r"LTSERVE_TOP_K / top_k \[LTSERVE_CONFIG=.*c\.yaml\]"):
        ServiceSettings.from_env()
    cfg.write_text("top_k: 3\nmax_batch_sise: 8\n")
    with pytest.raises(ConfigError) as err:
        ServiceSettings.from_env()
    msg = str(err.value)
    assert "'max_batch_sise'" in msg and "did you mean 'max_batch_size'" in msg
    assert all(field in msg for field in FIELD_VALUES), msg  # the valid keys are listed
    for text, problem in [("- top_k\n", "expected a mapping"), ("config: other.yaml\n", "'config' is not allowed"),
                          ("top_k: [\n", "cannot read it as YAML")]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            ServiceSettings.from_env()


def test_docs_list_every_setting():
    from ltserve.serve.settings import ServiceSettings

    page = (REPO / "docs" / "serving.md").read_text()
    start = page.index("## Settings")
    table = page[start:page.index("\n## ", start + 1)]
    missing = [f for f in ServiceSettings.model_fields if f"`LTSERVE_{f.upper()}`" not in table]
    assert missing == [], f"docs/serving.md '## Settings' lacks {missing}"


def test_missing_or_broken_package_stops_startup(package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    (broken / "model.onnx").write_bytes(b"not onnx")
    for model, problem in ((tmp_path / "missing", "not found"), (broken, "sha256")):
        out = subprocess.run([BENTOML, "serve", "--host", "127.0.0.1", "--port", str(free_port())], cwd=REPO,
                             env={**os.environ, "LTSERVE_MODEL": str(model)}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode != 0
        assert str(model) in out.stderr and problem in out.stderr


# -- real requests ---------------------------------------------------------------------------------------------------


def test_classify_with_httpx_curl_and_bentoml_client(server, predictor, images):
    import bentoml

    for name, path in images.items():
        expected = predictor.classify_bytes([path.read_bytes()], top_k=3)[0]
        r = httpx.post(server.url + "/classify", files={"image": (path.name, path.read_bytes())}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert_same(r.json(), expected)

    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    for name in ("fashion_0", "china", "astronaut"):
        path = images[name]
        out = subprocess.run([curl, "-sS", "-H", f"Authorization: Bearer {API_KEY}", "-F", f"image=@{path}",
                              server.url + "/classify"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert_same(json.loads(out.stdout), predictor.classify_bytes([path.read_bytes()], top_k=3)[0])

    with bentoml.SyncHTTPClient(server.url, token=API_KEY) as client:
        for name in ("fashion_1", "china", "astronaut"):
            path = images[name]
            got = client.classify(image=path)
            got = got if isinstance(got, dict) else got.model_dump()
            assert_same(got, predictor.classify_bytes([path.read_bytes()], top_k=3)[0])
        batch = client.classify_batch(images=[images["fashion_2"], images["china"]])
        batch = batch if isinstance(batch, dict) else batch.model_dump()
        expected = predictor.classify_bytes([images["fashion_2"].read_bytes(), images["china"].read_bytes()], 3)
        for got, want in zip(batch["predictions"], expected):
            assert_same(got, want)


def test_classify_batch_and_its_cap(server, predictor, images):
    paths = [images[f"fashion_{i}"] for i in range(MAX_BATCH_IMAGES)]
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = httpx.post(server.url + "/classify_batch", files=files, headers=AUTH)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    for got, want in zip(preds, predictor.classify_bytes([p.read_bytes() for p in paths], top_k=3)):
        assert_same(got, want)
    over = files + [("images", ("x.png", paths[0].read_bytes(), "image/png"))]
    assert_error(httpx.post(server.url + "/classify_batch", files=over, headers=AUTH), 413, "too_many_images")
    two = [("image", (p.name, p.read_bytes(), "image/png")) for p in paths[:2]]
    assert_error(httpx.post(server.url + "/classify", files=two, headers=AUTH), 400)
    bad = files[:2] + [("images", ("bad.png", b"\x89PNG\r\n\x1a\n garbage", "image/png"))]
    body = assert_error(httpx.post(server.url + "/classify_batch", files=bad, headers=AUTH), 400, "invalid_image")
    assert "images[2]" in body["detail"]


def post_raw(server, data, content_type: str | None = "image/jpeg", headers: dict | None = None,
             **kw) -> httpx.Response:
    """POST /classify_raw: `data` as the body (bytes, or an iterator: a chunked upload)."""
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return httpx.post(server.url + "/classify_raw", content=data, headers=headers, timeout=30, **kw)


def test_classify_raw_answers_what_classify_answers(server, predictor, images):
    """The raw body route: a real photo (JPEG), Fashion-MNIST PNGs and a TIFF, under their own media type and as
    application/octet-stream, answered byte for byte as /classify answers the same file (and as in process)."""
    tiff = io.BytesIO()
    Image.open(images["fashion_4"]).save(tiff, format="TIFF")
    uploads = [("china", images["china"].read_bytes(), "image/jpeg"),
               ("fashion_0", images["fashion_0"].read_bytes(), "image/png"),
               ("astronaut", images["astronaut"].read_bytes(), "image/png"),
               ("fashion_4 as tiff", tiff.getvalue(), "image/tiff")]
    for name, data, media in uploads:
        multipart = httpx.post(server.url + "/classify", files={"image": ("f", data, media)}, headers=AUTH, timeout=30)
        assert multipart.status_code == 200, (name, multipart.text)
        for ctype in (media, "application/octet-stream", f"{media.upper()}; charset=binary"):
            r = post_raw(server, data, ctype)
            assert r.status_code == 200, (name, ctype, r.text)
            assert r.headers["content-type"] == "application/json"
            assert r.json() == multipart.json(), (name, ctype)
        assert_same(r.json(), predictor.classify_bytes([data], top_k=3)[0])
    # the README's curl line
    out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {API_KEY}", "-H", "Content-Type: image/jpeg",
                          "--data-binary", f"@{images['china']}", server.url + "/classify_raw"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert_same(json.loads(out.stdout), predictor.classify_bytes([images["china"].read_bytes()], top_k=3)[0])
    metrics = httpx.get(server.url + "/metrics").text
    assert metric(metrics, "ltserve_requests_total", route="/classify_raw", status="200") >= 13


def test_classify_raw_errors_are_those_of_classify(server, images, url_target):
    """Each mistake answers its 4xx ErrorBody (401, 400, 413, 415) and the worker keeps serving; a URL as the body
    is never fetched."""
    url, hits = url_target
    jpeg = images["china"].read_bytes()
    ico = io.BytesIO()
    Image.open(images["fashion_0"]).save(ico, format="ICO")
    big = os.urandom(MAX_UPLOAD + 10)
    cases = [
        ("no API key", post_raw(server, jpeg, headers={"Authorization": ""}), 401, "unauthorized"),
        ("wrong API key", post_raw(server, jpeg, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized"),
        ("empty body", post_raw(server, b""), 400, "empty_body"),
        ("truncated jpeg", post_raw(server, jpeg[: len(jpeg) // 2]), 400, "invalid_image"),
        ("random bytes", post_raw(server, os.urandom(3000), "application/octet-stream"), 400, "invalid_image"),
        ("a URL as the body", post_raw(server, url.encode(), "image/png"), 400, "invalid_image"),
        ("text content type", post_raw(server, jpeg, "text/plain"), 415, "unsupported_media_type"),
        ("no content type", post_raw(server, jpeg, None), 415, "unsupported_media_type"),
        ("curl's default form type", post_raw(server, jpeg, "application/x-www-form-urlencoded"), 415,
         "unsupported_media_type"),
        ("multipart", post_raw(server, None, None, files={"image": ("a.jpg", jpeg, "image/jpeg")}), 415,
         "unsupported_media_type"),
        ("JSON", post_raw(server, json.dumps({"image": url}).encode(), "application/json"), 415,
         "unsupported_media_type"),
        ("an image type not accepted", post_raw(server, jpeg, "image/svg+xml"), 415, "unsupported_media_type"),
        ("ICO bytes", post_raw(server, ico.getvalue(), "application/octet-stream"), 415, "unsupported_format"),
        ("over the byte limit", post_raw(server, big, "image/png"), 413, "payload_too_large"),
        ("streamed over the byte limit", post_raw(server, (b"x" * 100_000 for _ in range(20)), "image/png"), 413,
         "payload_too_large"),
        ("over the pixel cap", post_raw(server, _bomb_png(), "image/png"), 413, "image_too_large"),
    ]
    for name, resp, status, error in cases:
        try:
            body = assert_error(resp, status, error)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        if error == "unsupported_media_type":
            assert "--data-binary" in body["detail"], (name, body)
        assert httpx.get(server.url + "/readyz").status_code == 200, name
    assert hits == []
    r = post_raw(server, images["fashion_1"].read_bytes(), "image/png")
    assert r.status_code == 200 and set(r.json()) >= {"label", "class_index", "probability", "shot_group", "top_k"}


def test_model_route(server, package):
    r = httpx.get(server.url + "/model", headers=AUTH)
    assert r.status_code == 200
    info = r.json()
    meta = json.loads((package / "model.json").read_text())
    assert info["labels"] == meta["labels"] and info["shot_groups"] == meta["shot_groups"]
    assert info["head"]["name"] == "lstsq" and info["metrics"] == meta["metrics"]
    assert info["provenance"]["ltserve_version"] == meta["provenance"]["ltserve_version"]
    assert info["service"]["top_k"] == 3 and info["service"]["max_batch_images"] == MAX_BATCH_IMAGES
    assert info["service"]["decode_threads"] == 3  # LTSERVE_CONFIG reached the decode pool
    assert info["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert_error(httpx.get(server.url + "/model"), 401, "unauthorized")


def test_api_key_and_open_health_routes(server, images):
    data = {"image": ("a.png", images["fashion_0"].read_bytes(), "image/png")}
    assert_error(httpx.post(server.url + "/classify", files=data), 401, "unauthorized")
    r = httpx.post(server.url + "/classify", files=data, headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_error(httpx.post(server.url + "/classify", files=data, headers={"Authorization": API_KEY}), 401)
    assert httpx.post(server.url + "/classify", files=data, headers=AUTH).status_code == 200
    for route in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + route).status_code == 200, route


def test_cors_only_for_the_configured_origin(server):
    pre = httpx.options(server.url + "/classify", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(server.url + "/classify", headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(server.url + "/model", headers={**AUTH, "Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        body = (Path(__file__).parents[1] / "conftest.py").read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def url_target():
    """A local HTTP server that records every request: a URL pointing here must never be fetched."""
    _RecordingHandler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cat.png", _RecordingHandler.hits
    httpd.shutdown()
    httpd.server_close()


TEXT_PART_TYPE = {"Content-Type": "multipart/form-data; boundary=ltserve-test"}


def text_part(field: str, value: str) -> bytes:
    """A multipart body whose `field` is a text part (what `curl -F field=value` sends), not a file."""
    return (f'--ltserve-test\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'
            "--ltserve-test--\r\n").encode()


def _bomb_png() -> bytes:
    """A real PNG of 2000 x 2000 black pixels (4 MP > the 1 MP limit) that compresses to a few kB."""
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_inputs_answer_4xx_json_and_the_service_keeps_serving(server, images, url_target, tmp_path):
    url, hits = url_target
    u = server.url + "/classify"
    jpeg = images["china"].read_bytes()
    ico = io.BytesIO()
    Image.open(images["fashion_0"]).save(ico, format="ICO")
    bomb = _bomb_png()
    assert len(bomb) < MAX_UPLOAD
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image\n" * 10)

    def post(**kw) -> httpx.Response:
        headers = {**AUTH, **kw.pop("headers", {})}
        return httpx.post(kw.pop("url", u), headers=headers, timeout=30, **kw)

    cases = [
        ("empty body", post(), 400, "empty_body"),
        ("empty multipart body", post(headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 400,
         "empty_body"),
        ("missing field", post(files={"file": ("a.png", images["fashion_0"].read_bytes(), "image/png")}), 400,
         "missing_field"),
        ("text file", post(files={"image": ("notes.txt", text_file.read_bytes(), "text/plain")}), 400,
         "invalid_image"),
        ("truncated jpeg", post(files={"image": ("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}), 400,
         "invalid_image"),
        ("random bytes, image type", post(files={"image": ("r.png", os.urandom(3000), "image/png")}), 400,
         "invalid_image"),
        ("empty file", post(files={"image": ("e.png", b"", "image/png")}), 400, "invalid_image"),
        ("unknown content type", post(content=jpeg, headers={"Content-Type": "application/x-foo"}), 415,
         "unsupported_media_type"),
        ("missing content type", post(content=jpeg), 415, "unsupported_media_type"),
        ("raw image body", post(content=jpeg, headers={"Content-Type": "image/jpeg"}), 415,
         "unsupported_media_type"),
        ("bad multipart", post(content=b"--xyz\r\nnonsense", headers={"Content-Type": "multipart/form-data"}), 400,
         None),
        ("decompression bomb", post(files={"image": ("bomb.png", bomb, "image/png")}), 413, "image_too_large"),
        ("upload over the byte limit", post(files={"image": ("big.bin", os.urandom(MAX_UPLOAD + 10),
                                                             "image/png")}), 413, "payload_too_large"),
        ("streamed upload over the byte limit",
         post(content=(b"x" * 100_000 for _ in range(20)),
              headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 413, "payload_too_large"),
        ("unsupported format", post(files={"image": ("a.ico", ico.getvalue(), "image/x-icon")}), 415,
         "unsupported_format"),
        ("URL string in the file field", post(content=text_part("image", url), headers=TEXT_PART_TYPE), 400,
         "not_a_file"),
        ("URL string, url-encoded form", post(data={"image": url}), 415, "unsupported_media_type"),
        ("URL in a JSON body", post(json={"image": url}), 415, "unsupported_media_type"),
        ("URL as raw text body", post(content=url.encode(), headers={"Content-Type": "text/plain"}), 415, None),
        ("batch: URL strings", post(url=server.url + "/classify_batch", content=text_part("images", url),
                                    headers=TEXT_PART_TYPE), 400, "not_a_file"),
    ]
    for name, resp, status, error in cases:
        assert resp.status_code < 500, name
        try:
            assert_error(resp, status, error)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        assert httpx.get(server.url + "/readyz").status_code == 200, name
    out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {API_KEY}", "-F", f"image={url}", u],
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["error"] == "not_a_file"
    assert hits == []  # nothing was ever fetched
    ok = post(files={"image": ("a.png", images["fashion_0"].read_bytes(), "image/png")})
    assert ok.status_code == 200


def test_concurrent_clients_all_correct_and_batched(server, predictor):
    fm, _ = read_fashion("t10k")
    pngs = []
    for a in fm[100:150]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    expected = predictor.classify_bytes(pngs, top_k=3)

    def client(worker: int) -> list[str]:
        errors = []
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
            for k in range(50):
                i = (worker * 7 + k) % len(pngs)
                r = c.post("/classify", files={"image": (f"{i}.png", pngs[i], "image/png")})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text}")
                    continue
                try:
                    assert_same(r.json(), expected[i])
                except AssertionError as exc:
                    errors.append(f"image {i}: {exc}")
        return errors

    with ThreadPoolExecutor(8) as pool:
        errors = [e for errs in pool.map(client, range(8)) for e in errs]
    assert errors == []

    metrics = httpx.get(server.url + "/metrics").text
    count = metric(metrics, "ltserve_batch_size_count")
    ones = metric(metrics, "ltserve_batch_size_bucket", le="1.0")
    assert count > ones, "no batch larger than 1 was run"
    assert metric(metrics, "ltserve_batch_size_sum") >= 400
    per_group = {g: metric(metrics, "ltserve_predictions_total", shot_group=g) for g in ("many", "medium", "few")}
    assert sum(per_group.values()) >= 400 and all(v > 0 for v in per_group.values())
    assert metric(metrics, "ltserve_requests_total", route="/classify") >= 400


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
              if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert values, f"metric {name}{labels or ''} not in /metrics"
    return float(sum(values))


def test_bentoml_build_holds_only_serving_dependencies(tmp_path):
    home = tmp_path / "bentoml_home"
    out = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
                                           "LTSERVE_MODEL": "/nonexistent"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    bentos = list((home / "bentos" / "ltserve").iterdir())
    bento = next(b for b in bentos if b.is_dir() and not b.is_symlink())
    req = (bento / "env" / "python" / "requirements.txt").read_text()
    pins = {re.split(r"[<>=!~\[; ]", line.strip())[0].lower(): line.strip() for line in req.splitlines()
            if line.strip() and not line.startswith(("#", "-"))}
    serving = {"bentoml", "httptools", "onnxruntime", "pillow", "numpy", "pydantic", "pydantic-settings", "pyyaml",
               "tqdm"}
    assert serving <= set(pins), req
    assert not {"torch", "torchvision", "timm", "onnx", "onnxscript", "matplotlib"} & set(pins), req
    assert all("==" in pins[name] for name in serving), req  # the tested versions, exactly
    src = bento / "src"
    assert (src / "ltserve" / "service.py").is_file() and (src / "ltserve" / "runtime" / "predictor.py").is_file()
    assert not list(src.rglob("*.pyc")) and not (src / "tests").exists()
    assert (src / "models" / "fashion-lt" / "model.json").is_file() == (REPO / "models/fashion-lt/model.json").is_file()


HANDLER_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from starlette.testclient import TestClient
from ltserve.service import Classifier

china, fashion, bad = (Path(p) for p in sys.argv[1:4])
calls = [("classify", "image", [china]), ("classify_batch", "images", [fashion] * 3), ("classify", "image", [bad]),
         ("classify_batch", "images", [fashion] * 5)]


async def direct():
    svc = Classifier()  # a plain Python object: no server, no request
    try:
        out = []
        for name, field, paths in calls:
            result = await getattr(svc, name)(**{field: paths[0] if field == "image" else paths})
            dump = result.model_dump(mode="json") if hasattr(result, "model_dump") else json.loads(result.body)
            out.append([type(result).__name__, dump])
        return out
    finally:
        svc.close()


def post(client, name, field, paths):
    r = client.post("/" + name, files=[(field, (p.name, p.read_bytes(), "application/octet-stream")) for p in paths])
    return [r.status_code, r.json()]


direct_results = asyncio.run(direct())
with TestClient(Classifier.to_asgi()) as client:
    http_results = [post(client, *call) for call in calls]
    inner = Classifier.inner  # the answer both paths run: change it, in process, and ask again
    original = inner.predictions

    async def changed(self, files):
        return [p.model_copy(update={"label": "changed:" + p.label}) for p in await original(self, files)]

    inner.predictions = changed
    try:
        changed_http = post(client, *calls[0])
        changed_direct = asyncio.run(direct())[0][1]
    finally:
        inner.predictions = original
print(json.dumps({"direct": direct_results, "http": http_results, "changed": changed_http,
                  "changed_direct": changed_direct}))
"""


def test_http_and_direct_calls_run_the_same_handler(package, images):
    """HTTP (through `Front`, `to_asgi()`) answers what a direct Python call of the `@bentoml.api` method returns,
    status included, and both run one answer: a change to `Classifier.predictions` is what both answer."""
    out = subprocess.run([sys.executable, "-c", HANDLER_SCRIPT, str(images["china"]), str(images["fashion_0"]),
                          __file__], capture_output=True, text=True, timeout=180, cwd=REPO,
                         env={**os.environ, "LTSERVE_MODEL": str(package), "LTSERVE_TOP_K": "3",
                              "LTSERVE_MAX_BATCH_IMAGES": "4", "LTSERVE_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    (t1, one), (t2, many), (t3, bad), (t4, over) = got["direct"]
    status, changed = got["changed"]
    assert status == 200 and changed == {**one, "label": "changed:" + one["label"]}, "HTTP did not run the change"
    assert got["changed_direct"] == changed, "a direct call did not run the change"
    # LivePrediction: a Prediction plus "adapted" (live label shift, on in report mode by default)
    assert t1 in ("Prediction", "LivePrediction") and [t2, t3, t4] == ["BatchResponse", "ErrorBody", "ErrorBody"]
    predictor = Predictor(package, threads=1)
    assert_same(one, predictor.classify_bytes([images["china"].read_bytes()], top_k=3)[0])
    assert len(many["predictions"]) == 3 and many["predictions"][0] == many["predictions"][2]
    assert bad["error"] == "invalid_image" and over["error"] == "too_many_images"
    assert [status for status, _ in got["http"]] == [200, 200, 400, 413]
    assert [body for _, body in got["http"]] == [one, many, bad, over]  # the same answers


def statuses_of(paths: dict, route: str, method: str) -> set[str]:
    return set(paths[route][method]["responses"])


def test_openapi_lists_every_route_status_and_the_security_scheme(server):
    doc = httpx.get(server.url + "/docs.json")
    assert doc.status_code == 200, doc.text[:500]
    spec = doc.json()
    paths = spec["paths"]
    prediction_fields = {"label", "class_index", "probability", "shot_group", "top_k"}
    one = paths["/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    one = spec["components"]["schemas"][one["$ref"].rsplit("/", 1)[-1]]  # a component: its optional fields nullable
    assert set(one["required"]) == prediction_fields
    assert one["properties"]["unknown"]["nullable"] is True and one["properties"]["label"]["nullable"] is True
    batch = paths["/classify_batch"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert batch["required"] == ["predictions"] and batch["properties"]["predictions"]["type"] == "array"
    item = batch["properties"]["predictions"]["items"]
    ref = item.get("$ref", "").rsplit("/", 1)[-1]
    # LivePrediction: a Prediction plus the optional "adapted" (live label shift, on in report mode by default)
    assert ref in ("Prediction", "LivePrediction") or set(item.get("required", [])) == prediction_fields, item
    if ref:
        assert set(spec["components"]["schemas"][ref]["required"]) == prediction_fields
    assert "multipart/form-data" in paths["/classify"]["post"]["requestBody"]["content"]

    # every route, every status it answers, errors as ErrorBody, the Bearer scheme where the key is needed
    assert set(paths) == {"/classify", "/classify_batch", "/classify_raw", "/model", "/prior", "/prior/reset",
                          "/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2",
                          "/v2/models/{model}", "/v2/models/{model}/ready", "/v2/models/{model}/infer"}
    assert statuses_of(paths, "/v2/models/{model}/infer", "post") == {"200", "400", "401", "404", "408", "413",
                                                                       "415", "503", "504"}
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error", "detail"]
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "LTSERVE_API_KEY, as `Authorization: Bearer <key>`"}
    statuses = {(route, method): set(op["responses"]) for route, item in paths.items() for method, op in item.items()}
    upload = {"200", "400", "401", "408", "413", "415", "503", "504"}
    assert statuses[("/classify", "post")] == statuses[("/classify_batch", "post")] == upload
    assert statuses[("/classify_raw", "post")] == upload
    assert statuses[("/model", "get")] == {"200", "401", "408", "503", "504"}
    assert statuses[("/prior", "get")] == statuses[("/prior/reset", "post")] == {"200", "401", "404", "408", "503",
                                                                                 "504"}
    assert statuses[("/readyz", "get")] == {"200", "408", "503"}
    for route in ("/classify", "/classify_batch", "/classify_raw", "/model", "/prior", "/prior/reset"):
        op = next(iter(paths[route].values()))
        assert op["security"] == [{"bearerAuth": []}], route
        for status, answer in op["responses"].items():
            if status != "200":
                assert answer["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"}, (route, status)
    images = paths["/classify_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert images["properties"]["images"]["minItems"] == 1
    assert images["properties"]["images"]["maxItems"] == MAX_BATCH_IMAGES
    assert images["additionalProperties"] is False
    raw = paths["/classify_raw"]["post"]
    assert raw["requestBody"]["required"] is True
    assert {"image/jpeg", "image/png", "image/tiff", "application/octet-stream"} <= set(raw["requestBody"]["content"])
    assert "text/plain" not in raw["requestBody"]["content"]  # BentoML's guess for a `bytes` body, refused (415)
    assert all(m["schema"]["format"] == "binary" for m in raw["requestBody"]["content"].values())
    assert raw["responses"]["200"] == paths["/classify"]["post"]["responses"]["200"]


SCHEMATHESIS_HOOKS = """
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def image_file(draw):
    # a real small image in one of the accepted formats: what a binary upload field holds when it is valid
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    shape = (h, w, 3) if draw(st.booleans()) else (h, w)
    pixels = np.random.default_rng(draw(st.integers(0, 2**31))).integers(0, 256, shape, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=draw(st.sampled_from(["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF",
                                                                   "PPM"])))
    return buf.getvalue()


schemathesis.openapi.format("binary", image_file())


# the raw-body route's media types that schemathesis has no serializer for: the bytes as they are, like octet-stream
schemathesis.serializer.alias(["image/pjpeg", "image/bmp", "image/x-ms-bmp", "image/tiff", "image/x-portable-anymap",
                               "image/x-portable-pixmap", "image/x-portable-graymap", "image/x-portable-bitmap"],
                              "application/octet-stream")
"""

# negative data (outside the schema) must be refused: 413 is this API's answer to too many images (maxItems)
SCHEMATHESIS_CONFIG = """
hooks = "ltserve_schemathesis_hooks"

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
"""


def test_schemathesis_finds_no_failure_in_the_openapi_contract(server, tmp_path):
    """schemathesis reads /docs.json and fuzzes every operation (coverage and fuzzing phases, valid and invalid
    data, every check: status codes, content types, headers, response schemas, auth, methods), bounded in time.

    A binary field is generated as a real small image (the hooks above): a schema cannot say that bytes must
    decode as an image, and random bytes are rightly answered 400. The seed is fixed so that the run is the same
    every time (about 300 cases, seconds). Seeds 1-3 at 300 examples pass too; seed 4 meets a false positive of
    schemathesis 4.32: a negative case whose mutation (an extra or renamed form field) is lost in the multipart
    encoding, so the wire request is valid and answered 200 (the class of its issue #4332)."""
    def raw_answered(status: str) -> float:
        text = httpx.get(server.url + "/metrics").text
        with contextlib.suppress(AssertionError):  # no such sample yet
            return metric(text, "ltserve_requests_total", route="/classify_raw", status=status)
        return 0.0

    before = raw_answered("200")
    (tmp_path / "ltserve_schemathesis_hooks.py").write_text(SCHEMATHESIS_HOOKS)
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is needed: pip install -e '.[dev]'"
    out = subprocess.run([st, "--config-file", "schemathesis.toml", "run", server.url + "/docs.json",
                          "-H", f"Authorization: Bearer {API_KEY}", "--checks", "all", "--max-examples", "100",
                          "--seed", "0", "--generation-database", "none", "--workers", "1",
                          # the v2 infer route: its schema cannot tie a tensor's shape to its data, so schema-valid
                          # cases are rightly refused 400; tests/serve/test_v2.py fuzzes its body for 4xx-never-5xx instead
                          "--exclude-path", "/v2/models/{model}/infer",
                          "--no-color"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    summary = out.stdout[-4000:]
    assert out.returncode == 0, summary
    assert "No issues found" in summary and "15 selected / 16 total" in out.stdout, summary
    assert raw_answered("200") - before >= 10, "the fuzzer sent /classify_raw no real image"


def test_serve_load_benchmark_smoke(tmp_path):
    """benchmarks/serve_load.py --smoke: a real server, the closed-loop client, and the three output files."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    http = result["results"]["tiny"]["http"]
    # /classify and /classify_raw at the same concurrencies, /classify_batch with 64 images per request
    assert set(http) == {"inprocess/batched", "inprocess/batched raw", "inprocess/batched batch64"}
    for key, concurrencies, per_request in [("inprocess/batched", [1, 4], 1), ("inprocess/batched raw", [1, 4], 1),
                                            ("inprocess/batched batch64", [1], 64)]:
        rows = http[key]
        assert [r["concurrency"] for r in rows] == concurrencies, key
        assert all(r["errors"] == 0 and r["requests"] > 0 and r["server_cpu_ms_per_req"] > 0 for r in rows), key
        assert all(abs(r["img_s"] - per_request * r["req_s"]) <= 1e-6 * r["img_s"] for r in rows), key
    assert [x["concurrency"] for x in result["results"]["tiny"]["raw_vs_multipart"]] == [1, 4]
    inproc = result["results"]["tiny"]["in_process"]
    assert inproc["ceiling_img_s"] > 0 and inproc["cpu_decode_img_s"] > 0 and inproc["backend"] == "onnxruntime"
    assert str(inproc["ceiling_decode_threads"]) in inproc["ceiling_by_decode_threads"]  # JSON: keys are strings
    # the server's own account of what it ran, so that a run can show both sides used the same backend
    runtime = result["results"]["tiny"]["server_runtime"]["inprocess/batched"]
    assert runtime["backend"] == "onnxruntime" and runtime["providers"] == ["CPUExecutionProvider"]
    assert result["environment"]["versions"]["bentoml"]
    assert (tmp_path / "results.md").read_text().count("inprocess/batched raw") == 2
    assert (tmp_path / "results.png").is_file()


def test_tiff_upload_is_classified(server, predictor, images):
    """A TIFF upload answers 200 with the prediction of the same image sent as PNG (TIFF is an accepted format)."""
    tiff = io.BytesIO()
    Image.open(images["fashion_3"]).save(tiff, format="TIFF", compression="tiff_deflate")
    r = httpx.post(server.url + "/classify", files={"image": ("scan.tif", tiff.getvalue(), "image/tiff")},
                   headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert_same(r.json(), predictor.classify_bytes([images["fashion_3"].read_bytes()], top_k=3)[0])


TIMERS_SCRIPT = """
import asyncio, gc, json, sys
from pathlib import Path
from starlette.testclient import TestClient
from ltserve.service import Classifier

image = Path(sys.argv[1]).read_bytes()


def pending_timers():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle) and not o.cancelled())


with TestClient(Classifier.to_asgi()) as client:
    before = pending_timers()
    statuses = set()
    for i in range(int(sys.argv[2])):
        files = {"image": ("a.png", image if i % 2 else b"not an image", "application/octet-stream")}
        statuses.add(client.post("/classify", files=files).status_code)
    print(json.dumps({"before": before, "after": pending_timers(), "statuses": sorted(statuses)}))
"""


def test_answered_requests_leave_no_timer_holding_them(package, images):
    """BentoML's traffic timeout (`TimeoutMiddleware`) left one uncancelled 31 s timer per answered request, holding
    the request's context (measured: ~13 kB per request, rate x timeout of them per worker). Replaced by
    `TrafficTimeout`, the timers pending after many requests do not grow with their number."""
    n = 200
    out = subprocess.run([sys.executable, "-c", TIMERS_SCRIPT, str(images["fashion_0"]), str(n)], capture_output=True,
                         text=True, timeout=180, cwd=REPO,
                         env={**os.environ, "LTSERVE_MODEL": str(package), "LTSERVE_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["statuses"] == [200, 400]
    assert got["after"] - got["before"] < 20, got  # before the fix: n more (one per request, for 31 s)
