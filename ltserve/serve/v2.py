"""The Open Inference Protocol (KServe v2 / Triton HTTP) for an ltserve package: requests in, answers out, no I/O.

The model takes one input, `image`: BYTES, shape [N] (or [N, 1]), each element one encoded image (JPEG, PNG, ...):
base64 text in a JSON request, raw bytes with the binary-data extension (the input's `parameters.binary_data_size`,
the JSON header's length in the `Inference-Header-Content-Length` header, each element a 4-byte little-endian
length and its bytes, as Triton serialises BYTES). It answers one output, `probabilities`: FP32 [N, C], the softmax
of the served logits (the same as /classify's, live prior included); with the classification extension
(`parameters.classification: k` on the requested output) it is BYTES [N, k] of "score:index:label" strings, best
first. Outputs are JSON unless the output asks `binary_data: true` (or the request `binary_data_output: true`), then
raw little-endian bytes after the JSON. Errors are the protocol's `{"error": message}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

INPUT = "image"
OUTPUT = "probabilities"
HEADER_LENGTH = "inference-header-content-length"


class V2Error(Exception):
    """A request the protocol refuses: the HTTP status and the message of `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Output:
    """A requested output: binary or JSON data, and k > 0 for the classification extension."""

    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    output: Output


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def metadata(name: str, num_classes: int, platform: str) -> dict[str, Any]:
    """GET /v2/models/{name}: the model's inputs and outputs."""
    return {"name": name, "versions": ["1"], "platform": platform,
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, num_classes]}]}


def parse_infer(body: bytes, header_length: str, max_images: int) -> InferRequest:
    """An infer request's images and requested output.

    Raises:
        V2Error: 400 for anything malformed (what and where), 413 for more than `max_images` images.
    """
    head, tail = _split(body, header_length)
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise V2Error(400, f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise V2Error(400, "the request must be a JSON object with an 'inputs' list")
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2Error(400, f"the model takes exactly one input, {INPUT!r} (BYTES), got {len(inputs)}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT or tensor.get("datatype") != "BYTES":
        raise V2Error(400, f"the input must be named {INPUT!r} with datatype BYTES (encoded images), got "
                           f"{tensor.get('name')!r} {tensor.get('datatype')!r}")
    size = _parameters(tensor).get("binary_data_size")
    images = _binary_elements(tail, size) if size is not None else _json_elements(tensor.get("data"))
    if len(images) > max_images:
        raise V2Error(413, f"{len(images)} images in one request; at most {max_images} (LTSERVE_MAX_BATCH_IMAGES)")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            and shape and int(np.prod(shape)) == len(images) and len(shape) <= 2):
        raise V2Error(400, f"input shape {shape!r} does not match its {len(images)} element(s): use [N] or [N, 1]")
    if not images:
        raise V2Error(400, "the input holds no image")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error(400, f"'id' must be a string, got {request_id!r}")
    return InferRequest(request_id, images, _output(request))


def encode_infer(model: str, request: InferRequest, probabilities: np.ndarray,
                 labels: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers, for `probabilities` (N, C)."""
    n, c = probabilities.shape
    out: dict[str, Any] = {"name": OUTPUT}
    if request.output.classification:
        k = min(request.output.classification, c)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        strings = [f"{probabilities[i, j]:.6f}:{j}:{labels[j]}" for i in range(n) for j in order[i]]
        out.update(datatype="BYTES", shape=[n, k])
        raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in strings)
        data: Any = strings
    else:
        values = probabilities.astype("<f4")
        out.update(datatype="FP32", shape=[n, c])
        raw, data = values.tobytes(), values.ravel().tolist()
    if request.output.binary:
        out["parameters"] = {"binary_data_size": len(raw)}
    else:
        out["data"] = data
    answer: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [out]}
    if request.id is not None:
        answer["id"] = request.id
    head = json.dumps(answer).encode()
    if not request.output.binary:
        return head, {}
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _split(body: bytes, header_length: str) -> tuple[bytes, bytes]:
    if not header_length:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise V2Error(400, f"Inference-Header-Content-Length {header_length!r} does not fit the {len(body)}-byte body")
    n = int(header_length)
    return body[:n], body[n:]


def _parameters(obj: dict) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error(400, "'parameters' must be an object")
    return params


def _json_elements(data: Any) -> list[bytes]:
    if not isinstance(data, list):
        raise V2Error(400, f"input {INPUT!r} has no 'data' list (or binary_data_size for the binary extension)")
    flat = [x for row in data for x in row] if data and all(isinstance(r, list) for r in data) else data
    images = []
    for i, item in enumerate(flat):
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise V2Error(400, f"{INPUT}[{i}] is not base64 text: in JSON, BYTES elements are the images' bytes in "
                               "base64 (or send them raw with the binary-data extension)") from None
    return images


def _binary_elements(tail: bytes, size: Any) -> list[bytes]:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(tail):
        raise V2Error(400, f"binary_data_size {size!r} does not match the {len(tail)} bytes after the JSON header")
    images, pos = [], 0
    while pos < len(tail):
        if pos + 4 > len(tail):
            raise V2Error(400, "the binary input ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", tail, pos)
        if pos + 4 + length > len(tail):
            raise V2Error(400, f"binary element {len(images)} is longer than the data left")
        images.append(tail[pos + 4:pos + 4 + length])
        pos += 4 + length
    return images


def _output(request: dict) -> Output:
    binary_default = _flag(_parameters(request), "binary_data_output", False)
    outputs = request.get("outputs")
    if outputs is None or outputs == []:
        return Output(binary_default)
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise V2Error(400, f"request at most one output, {OUTPUT!r}")
    if outputs[0].get("name") != OUTPUT:
        raise V2Error(400, f"unknown output {outputs[0].get('name')!r}; the model's output is {OUTPUT!r}")
    params = _parameters(outputs[0])
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise V2Error(400, f"classification must be a count of classes >= 0, got {k!r}")
    return Output(_flag(params, "binary_data", binary_default), k)


def _flag(params: dict, name: str, default: bool) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise V2Error(400, f"{name} must be true or false, got {value!r}")
    return value
