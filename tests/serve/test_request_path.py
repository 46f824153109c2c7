"""The request path counts work, not time: each upload is read once and parsed once, no file is written, each image
header is read once, and BentoML's own parser, typed API layer and middlewares are not on the path of ltserve's
routes (in process, `to_asgi()`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from package_helpers import build_lsq_package

REPO = Path(__file__).resolve().parents[2]

COUNT_SCRIPT = """
import io, json, os, sys, tempfile
from collections import Counter
import numpy as np
from PIL import Image
from starlette.testclient import TestClient

calls = Counter()

def counting(owner, name, key):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        calls[key] += 1
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)

import ltserve.preprocess as preprocess
import ltserve.serve.uploads as uploads
import starlette.requests
counting(preprocess, "_open_header", "header")
counting(uploads, "parse", "parse")
for name in ("mkstemp", "NamedTemporaryFile", "SpooledTemporaryFile", "TemporaryFile", "mkdtemp"):
    counting(tempfile, name, "tempfile")
counting(starlette.requests.Request, "form", "starlette_form")
counting(starlette.requests.Request, "body", "starlette_body")

from ltserve.service import Classifier
import _bentoml_impl.server.app as bentoml_app
counting(bentoml_app.ServiceAppFactory, "api_endpoint_wrapper", "bentoml_api")

pngs = []
for k in range(3):
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 40 * k, np.uint8)).save(buf, format="PNG")
    pngs.append(buf.getvalue())

with TestClient(Classifier.to_asgi()) as client:
    client.post("/classify", files={"image": ("a.png", pngs[0], "image/png")})  # warm: first-call imports
    calls.clear()
    statuses = [client.post("/classify", files={"image": ("a.png", pngs[0], "image/png")}).status_code,
                client.post("/classify_batch", files=[("images", (f"{k}.png", p, "image/png"))
                                                      for k, p in enumerate(pngs)]).status_code,
                client.post("/classify_raw", content=pngs[1], headers={"Content-Type": "image/png"}).status_code]
print(json.dumps({"statuses": statuses, "calls": dict(calls)}))
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_lsq_package(tmp_path_factory.mktemp("pkg") / "pkg", n_train=2000)


def test_each_upload_is_parsed_once_and_nothing_is_written_to_disk(package):
    out = subprocess.run([sys.executable, "-c", COUNT_SCRIPT], capture_output=True, text=True, timeout=180,
                         cwd=REPO, env={**os.environ, "LTSERVE_MODEL": str(package), "LTSERVE_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["statuses"] == [200, 200, 200], got
    calls = got["calls"]
    # /classify and /classify_batch: one multipart parse each; /classify_raw: none
    assert calls.get("parse", 0) == 2, calls
    # one header read per image: 1 + 3 + 1
    assert calls.get("header", 0) == 5, calls
    assert calls.get("tempfile", 0) == 0, calls
    assert calls.get("starlette_form", 0) == 0 and calls.get("starlette_body", 0) == 0, calls
    assert calls.get("bentoml_api", 0) == 0, calls


PAGE_SCRIPT = """
import json, re
from starlette.testclient import TestClient
from ltserve.service import Classifier

with TestClient(Classifier.to_asgi()) as client:
    pages = {path: client.get(path) for path in ("/", "/docs")}
    page = pages["/"]
    refs = re.findall(r'(?:src|href)=["\\']([^"\\']+)["\\']', page.text)
    assets = {ref: client.get("/" + ref.lstrip("./")).status_code for ref in refs}
    spec = client.get("/docs.json").json()
    bundle = client.get("/static_content/swagger-ui-bundle.js").text
    model = spec["paths"]["/v2/models/{model}/infer"]["post"]["parameters"][0]["schema"]["enum"][0]
    example = spec["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]["application/json"]["example"]
    infer = client.post(f"/v2/models/{model}/infer", json=example)
print(json.dumps({"statuses": {p: r.status_code for p, r in pages.items()}, "same": pages["/"].text == pages["/docs"].text,
                  "html": page.text, "csp": page.headers.get("content-security-policy", ""), "assets": assets,
                  "summaries": {p: [op.get("summary") for op in item.values()] for p, item in spec["paths"].items()},
                  "servers": spec.get("servers"), "openapi": spec["openapi"],
                  "batch": spec["paths"]["/classify_batch"]["post"]["requestBody"]["content"],
                  "bundle_array": "class JsonSchema_array" in bundle and "wrapComponents" in bundle,
                  "infer": [infer.status_code, infer.json()]}))
"""


@pytest.fixture(scope="module")
def api_page(package) -> dict:
    """What PAGE_SCRIPT saw of the API page, its assets and its contract (one service start for the page tests)."""
    out = subprocess.run([sys.executable, "-c", PAGE_SCRIPT], capture_output=True, text=True, timeout=180, cwd=REPO,
                         env={**os.environ, "LTSERVE_MODEL": str(package), "LTSERVE_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_api_page_loads_nothing_from_another_host(api_page):
    """`/` and `/docs` serve the same Swagger page; every file it names is served here, it names no other host,
    Swagger's validator is off, its CSP admits only this origin, and every route has a one-line summary."""
    got = api_page
    assert got["statuses"] == {"/": 200, "/docs": 200} and got["same"]
    page = got["html"]
    assert "<title>ltserve: fashion-lsq</title>" in page
    assert "googletagmanager" not in page.lower()
    assert not re.search(r"\bhttps?://", page), "the page names another host"
    assert re.search(r"validatorUrl:\s*null", page)
    assert got["assets"] and all(status == 200 for status in got["assets"].values()), got["assets"]
    assert all(ref.startswith("./static_content/") for ref in got["assets"])
    assert "default-src 'self'" in got["csp"] and "connect-src 'self'" in got["csp"]
    assert got["servers"] is None
    missing = [p for p, summaries in got["summaries"].items() if not all(summaries)]
    assert not missing, f"routes without a summary: {missing}"


def test_the_api_page_uploads_several_files_to_classify_batch(api_page):
    """Try it out on /classify_batch offers one multi-file input and sends the chosen files, not placeholder text.

    The bundled Swagger UI (5.12) draws an OpenAPI 3.0 array of `format: binary` strings as an empty list with an
    "Add string item" button per file, and sends an item left without a file as the text "string"; the page's
    plugin replaces that array component, for binary items only, by `<input type="file" multiple>` (checked in
    headless Chromium when written: the three chosen files went out as three `images` parts). Here: the contract
    keeps the spelling the plugin keys on, with no example or default that Swagger would prefill as a text item,
    and the page wraps the component the served bundle defines."""
    got = api_page
    assert got["openapi"].startswith("3.0."), got["openapi"]  # format: binary, not 3.1's contentMediaType
    assert list(got["batch"]) == ["multipart/form-data"]
    field = got["batch"]["multipart/form-data"]["schema"]["properties"]["images"]
    assert field["type"] == "array" and field["items"] == {"type": "string", "format": "binary"}, field
    assert not {"example", "examples", "default"} & (set(field) | set(field["items"])), field
    page = got["html"]
    assert re.search(r"plugins:\s*\[MultiFileUpload\]", page)
    assert "JsonSchema_array: function (Original, system)" in page and "multiple: true" in page
    assert 'items.get("type") === "string" && items.get("format") === "binary"' in page
    assert "system.Im.List(" in page  # the File objects themselves are the field's value
    assert got["bundle_array"], "the served Swagger UI has no JsonSchema_array component for the plugin to wrap"


def test_the_infer_example_is_a_real_request(api_page):
    """Try it out on the Open Inference Protocol's infer route sends its example as is: a real PNG, answered 200
    with the top 3 (Swagger's generated sample would send the text "string" as base64 image data)."""
    status, body = api_page["infer"]
    assert status == 200, body
    (out,) = body["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "BYTES" and out["shape"] == [1, 3]
    assert all(len(s.split(":")) == 3 for s in out["data"])  # score:index:label
