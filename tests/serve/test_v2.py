"""The Open Inference Protocol (KServe v2 / Triton HTTP) on a real `bentoml serve`, called with the real
`tritonclient[http]` client: health, metadata, infer (JSON with base64 images, and the binary-data extension), the
classification extension, errors in the protocol's shape, and answers equal to /classify's for the same images."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonhttp
from PIL import Image

from ltserve.serve.process import ServerProcess
from package_helpers import build_lsq_package, read_fashion



@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_lsq_package(tmp_path_factory.mktemp("v2") / "pkg", n_train=3000)


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    with ServerProcess({"LTSERVE_MODEL": str(package), "LTSERVE_MAX_BATCH_IMAGES": "8", "LTSERVE_TOP_K": "10",
                        "BENTOML_DO_NOT_TRACK": "True"}, tmp_path_factory.mktemp("v2log") / "server.log") as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    images, _ = read_fashion("t10k")
    out = []
    for a in images[:6]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def client(server):
    return tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server.port}")


def infer(server, images: list[bytes], binary: bool, class_count: int = 0, model: str = "fashion-lsq"):
    data = np.array(images if binary else [base64.b64encode(b) for b in images], dtype=np.object_)
    tensor = tritonhttp.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    output = tritonhttp.InferRequestedOutput("probabilities", binary_data=binary, class_count=class_count)
    return client(server).infer(model, [tensor], outputs=[output])


def classify(server, image: bytes) -> dict:
    r = httpx.post(server.url + "/classify", files={"image": ("a.png", image, "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_metadata(server, package):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("fashion-lsq")
    assert not c.is_model_ready("other")
    meta = c.get_model_metadata("fashion-lsq")
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0]["name"] == "probabilities" and meta["outputs"][0]["shape"] == [-1, 10]
    assert "classification" in c.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_answers_what_classify_answers(server, pngs, binary):
    probs = infer(server, pngs, binary).as_numpy("probabilities")
    assert probs.shape == (len(pngs), 10) and probs.dtype == np.float32
    for row, image in zip(probs, pngs):
        answer = classify(server, image)
        assert int(row.argmax()) == answer["class_index"]
        for entry in answer["top_k"]:
            assert abs(float(row[entry["class_index"]]) - entry["probability"]) <= 1e-6


def test_classification_extension(server, pngs):
    top = infer(server, pngs[:2], True, class_count=3).as_numpy("probabilities")
    assert top.shape == (2, 3)
    for row, image in zip(top, pngs[:2]):
        answer = classify(server, image)
        fields = [s.decode().split(":", 2) for s in row]
        assert [int(f[1]) for f in fields] == [e["class_index"] for e in answer["top_k"][:3]]
        assert [f[2] for f in fields] == [e["label"] for e in answer["top_k"][:3]]
        assert abs(float(fields[0][0]) - answer["probability"]) <= 1e-6


def test_errors_are_in_the_protocol_shape(server, pngs):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        infer(server, pngs[:1], True, model="other")
    with pytest.raises(InferenceServerException, match="not a[n]? ?image|not JPEG"):
        infer(server, [b"not an image"], True)
    with pytest.raises(InferenceServerException, match="at most 8"):
        infer(server, pngs[:1] * 9, True)
    url = f"{server.url}/v2/models/fashion-lsq/infer"
    cases = [({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}, 400),
             ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400),
             ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(pngs[0]).decode()]}]}, 400)]
    for body, status in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status and set(r.json()) == {"error"}, r.text
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'ltserve_requests_total{route="/v2/models/{model}/infer",status="200"}' in metrics


def test_malformed_infer_bodies_get_4xx_never_5xx(server, pngs):
    """Mutations of a valid JSON infer request, seeded: every answer is a 4xx in the protocol's error shape, or a 200
    (a mutation that is still a valid request), never a server error; the server keeps answering."""
    rng = np.random.default_rng(0)
    valid = {"id": "a", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                    "data": [base64.b64encode(pngs[0]).decode()]}],
             "outputs": [{"name": "probabilities", "parameters": {"classification": 2, "binary_data": False}}]}
    junk = [None, 0, -1, 1.5, True, "", "x", [], {}, [None], {"a": 1}, "%%%", [1, 2], 2**40]
    paths = [("id",), ("inputs",), ("inputs", 0), ("inputs", 0, "name"), ("inputs", 0, "shape"),
             ("inputs", 0, "datatype"), ("inputs", 0, "data"), ("inputs", 0, "data", 0), ("inputs", 0, "parameters"),
             ("outputs",), ("outputs", 0), ("outputs", 0, "name"), ("outputs", 0, "parameters"),
             ("outputs", 0, "parameters", "classification"), ("outputs", 0, "parameters", "binary_data"),
             ("parameters",)]
    import copy
    import json

    url = f"{server.url}/v2/models/fashion-lsq/infer"
    statuses = set()
    with httpx.Client(timeout=30) as http:
        for _ in range(120):
            body = copy.deepcopy(valid)
            path = paths[rng.integers(len(paths))]
            node = body
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = junk[rng.integers(len(junk))]
            r = http.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})
            statuses.add(r.status_code)
            assert r.status_code == 200 or (400 <= r.status_code < 500 and set(r.json()) == {"error"}), (body, r.text)
        assert http.post(url, json=valid).status_code == 200
    assert 400 in statuses
