"""The service's OpenAPI contract: BentoML's generated document, completed so that a fuzzer can verify it.

BentoML 1.4 documents its API methods (request bodies, the 200 schema) and its health routes, and nothing else:
not ltserve's own routes (`GET /model`, the prior, the protocol's), not the answers `Front`, the connection layer and the handlers give
(401 408 413 415 503 504), not the Bearer scheme; it lists 404/500 bodies of its own that this service never sends
for these routes, and leaves the upload forms open (any other field, an empty `images` list). `complete_openapi`
fills that in from what the code does, and the service answers `GET /docs.json` with the result:

- every route: the three classify methods (two multipart, one raw body), `GET /model`, `GET /prior` and
  `POST /prior/reset` (live label shift),
  `/livez` `/healthz` `/readyz` `/metrics`;
- every status each one answers, errors as the `ErrorBody` schema (`{"error", "detail"}`, both required);
- the upload forms: only their one field (`additionalProperties: false`), `images` with 1 to max_batch_images
  items; the raw-body route: a binary body under each accepted media type (image types, application/octet-stream),
  where BentoML says text/plain;
- the Bearer security scheme on the protected routes when an API key is set;
- a request example where Swagger UI's own would fail: the Open Inference Protocol's infer body, whose generated
  sample sends the text "string" as base64 image data, carries one real PNG (`infer_example`).
"""

from __future__ import annotations

import base64
import copy
import io
from functools import lru_cache
from typing import Any

from PIL import Image

from ltserve.preprocess import FORMAT_NAMES
from ltserve.serve.http import ErrorBody
from ltserve.serve.openapi_v2 import v2_paths
from ltserve.serve.settings import (BATCH_ROUTE, CLASSIFY_ROUTE, MODEL_ROUTE, PRIOR_RESET_ROUTE, PRIOR_ROUTE,
                                   PROTECTED_ROUTES, RAW_MEDIA_TYPES, RAW_ROUTE, UPLOAD_FIELDS, V2_INFER_ROUTE,
                                   ServiceSettings)
from ltserve.serve.v2 import INPUT, OUTPUT

SCHEMAS = "#/components/schemas/"
SECURITY_SCHEME = "bearerAuth"

MODEL_INFO_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "ModelInfo",
    "description": "The served model package and this worker's runtime (GET /model)",
    "required": ["name", "labels", "class_counts", "shot_groups", "preprocess", "jpeg_draft", "head", "metrics",
                 "provenance", "runtime", "service"],
    "properties": {
        "name": {"type": "string"},
        "labels": {"type": "array", "items": {"type": "string"}},
        "class_counts": {"type": "array", "items": {"type": "integer"}},
        "shot_groups": {"type": "array", "items": {"type": "string", "enum": ["many", "medium", "few"]}},
        "preprocess": {"type": "object"},
        "jpeg_draft": {"type": "object", "required": ["on"], "description": "whether JPEG draft (DCT-domain) "
                       "decoding runs, and the reason export recorded",
                       "properties": {"on": {"type": "boolean"}, "reason": {"type": "string"}}},
        "head": {"type": "object"}, "metrics": {"type": "object"},
        "provenance": {"type": "object"}, "runtime": {"type": "object"},
        "service": {"type": "object", "description": "this server's limits, workers, and the answering worker's pid"},
    },
}


PRIOR_REPORT_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "PriorReport",
    "description": "The live class prior of this server's traffic, merged over its workers (GET /prior)",
    "required": ["mode", "method", "estimated", "adapting", "n", "distance", "classes"],
    "properties": {
        "mode": {"type": "string", "enum": ["report", "apply"]},
        "method": {"type": "string", "enum": ["em", "bbse"], "description": "the estimator in use"},
        "method_setting": {"type": "string", "enum": ["auto", "em", "bbse"],
                           "description": "LTSERVE_PRIOR_METHOD; auto is resolved to method once, at start"},
        "method_reason": {"type": "string", "description": "why this estimator (auto: whether model.json records a "
                                                           "usable val confusion matrix)"},
        "estimated": {"type": "boolean", "description": "false below the sample floor: the estimate is the target"},
        "adapting": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0},
        "distance": {"type": "object", "description": "from the package's target prior (total variation)"},
        "classes": {"type": "array", "items": {"type": "object", "required": ["label", "estimate", "target"]}},
    },
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {"application/json": {"schema": {"$ref": SCHEMAS + "ErrorBody"}}}}
    if headers:
        answer["headers"] = headers
    return answer


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def error_answers(settings: ServiceSettings, *, route: str, open_route: bool = False) -> dict[str, Any]:
    """The error answers every request to `route` may get from the layers in front of its handler: 401 (API key),
    408 (receive deadline), 503 (connection cap; not for health and metrics routes), 504 (time limit)."""
    answers: dict[str, Any] = {}
    if settings.api_key is not None and route in PROTECTED_ROUTES:
        answers["401"] = _error("missing or wrong API key (`Authorization: Bearer <key>`)",
                                {"WWW-Authenticate": {"schema": {"type": "string"}}})
    answers["408"] = _error(f"the request was not received in full within {settings.receive_timeout_s:g} s "
                            "(LTSERVE_RECEIVE_TIMEOUT_S); the connection is closed")
    if not open_route:
        answers["503"] = _error(f"the worker holds more than {settings.max_connections} open connections, all busy "
                                "(LTSERVE_MAX_CONNECTIONS): retry", {"Retry-After": {"schema": {"type": "string"}}})
        answers["504"] = _error(f"not answered within {settings.timeout_s:g} s (LTSERVE_TIMEOUT_S); the connection "
                                "is closed")
    return answers


def _upload_operation(op: dict[str, Any], route: str, settings: ServiceSettings) -> dict[str, Any]:
    field = UPLOAD_FIELDS[route]
    media = op["requestBody"]["content"]["multipart/form-data"]
    schema = media["schema"]
    schema["additionalProperties"] = False  # the upload rules refuse any other field (400 unknown_field)
    prop = schema["properties"][field]
    if route == BATCH_ROUTE:
        prop["minItems"] = 1
        prop["maxItems"] = settings.max_batch_images
        prop["description"] = (f"1 to {settings.max_batch_images} image files (LTSERVE_MAX_BATCH_IMAGES): "
                               f"{FORMAT_NAMES}")
    else:
        prop["description"] = f"one image file: {FORMAT_NAMES}"
    op["requestBody"]["required"] = True
    op["responses"] = _classify_answers(op, route, settings, (
        "a malformed request (empty body, bad multipart, a missing, unknown or text field, two files for /classify) "
        "or a file that is not a decodable image"), "not multipart/form-data, or an image format that is not accepted")
    return op


def _raw_operation(op: dict[str, Any], settings: ServiceSettings) -> dict[str, Any]:
    """The raw-body route: BentoML documents its positional-only `bytes` parameter as a text/plain body; it is the
    image bytes, under any of the image media types or application/octet-stream."""
    body = {"type": "string", "format": "binary",
            "description": f"the bytes of one image ({FORMAT_NAMES}); the format is read from the bytes"}
    op["requestBody"] = {"required": True, "content": {media: {"schema": dict(body)} for media in RAW_MEDIA_TYPES}}
    op["responses"] = _classify_answers(op, RAW_ROUTE, settings, "an empty body, or bytes that are not a decodable "
                                        "image", "a Content-Type that is not an image type or "
                                        "application/octet-stream, or an image format that is not accepted")
    return op


def _classify_answers(op: dict[str, Any], route: str, settings: ServiceSettings, bad_request: str,
                      unsupported: str) -> dict[str, Any]:
    """Every answer of a classify route: BentoML's 200, the 4xx of the upload rules and the handler, and `error_answers`."""
    return {
        "200": _answer_ref(op["responses"].get(200) or op["responses"]["200"], route),
        "400": _error(bad_request),
        "413": _error(f"the body is over {settings.max_upload_bytes} bytes (LTSERVE_MAX_UPLOAD_BYTES), an image over "
                      f"{settings.max_pixels} pixels (LTSERVE_MAX_PIXELS), the images over "
                      f"{settings.max_request_pixels} pixels in all (LTSERVE_MAX_REQUEST_PIXELS)"
                      + (f", or more than {settings.max_batch_images} images (LTSERVE_MAX_BATCH_IMAGES)"
                         if route == BATCH_ROUTE else "")),
        "415": _error(unsupported),
        **error_answers(settings, route=route),
    }


def _answer_ref(ok: dict[str, Any], route: str) -> dict[str, Any]:
    """BentoML's 200 answer (its dict keys statuses as ints) of a one-image route, its schema replaced by a reference
    to the answer's component schema: BentoML writes it inline and, doing so, drops `null` from the optional fields
    (`_flatten_field` keeps the first type of an `anyOf`)."""
    if route == BATCH_ROUTE:
        return ok
    media = ok["content"]["application/json"]
    name = media["schema"].get("title", "").removesuffix("IODescriptor") or "Prediction"
    return {**ok, "content": {"application/json": {**media, "schema": {"$ref": SCHEMAS + name}}}}


def _model_operation(settings: ServiceSettings) -> dict[str, Any]:
    return {
        "tags": ["Service APIs"], "operationId": "ltserve__model", "description": "The served model and runtime",
        "responses": {
            "200": {"description": "Successful Response",
                    "content": {"application/json": {"schema": {"$ref": SCHEMAS + "ModelInfo"}}}},
            **error_answers(settings, route=MODEL_ROUTE),
        },
    }


def _prior_operation(settings: ServiceSettings, route: str) -> dict[str, Any]:
    reset = route == PRIOR_RESET_ROUTE
    return {
        "tags": ["Service APIs"], "operationId": "ltserve__prior_reset" if reset else "ltserve__prior",
        "description": ("Forget the traffic seen so far, in every worker: back to the package's target prior"
                        if reset else "The class prior of the live traffic, estimated from the model's outputs"),
        "responses": {
            "200": {"description": "Successful Response" + (": the report after the reset" if reset else ""),
                    "content": {"application/json": {"schema": {"$ref": SCHEMAS + "PriorReport"}}}},
            "404": _error("live label-shift estimation is off (LTSERVE_PRIOR_ADAPT=off)"),
            **error_answers(settings, route=route),
        },
    }


def complete_openapi(spec: dict[str, Any], settings: ServiceSettings, version: str, model: str) -> dict[str, Any]:
    """BentoML's OpenAPI document of the service (`Service.openapi_spec.asdict()`), completed (see the module).

    Args:
        spec: BentoML's document (not changed).
        settings: the service settings (limits, API key) the answers describe.
        version: the service's version, for `info.version`.
        model: the served package's name (the Open Inference Protocol's model name).

    Returns:
        a new OpenAPI 3 document.
    """
    doc = copy.deepcopy(spec)
    doc["info"] = {"title": "ltserve", "version": version,
                   "description": "Long-tailed image classification: upload images, get the top-k classes with "
                                  "their shot group (many, medium, few). Errors are `ErrorBody` JSON."}
    doc.pop("servers", None)  # BentoML's [{"url": "."}]: the page and clients use the server they were loaded from
    paths = doc["paths"]
    for route in (CLASSIFY_ROUTE, BATCH_ROUTE):
        _upload_operation(paths[route]["post"], route, settings)
    _raw_operation(paths[RAW_ROUTE]["post"], settings)
    paths[MODEL_ROUTE] = {"get": _model_operation(settings)}
    paths[PRIOR_ROUTE] = {"get": _prior_operation(settings, PRIOR_ROUTE)}
    paths[PRIOR_RESET_ROUTE] = {"post": _prior_operation(settings, PRIOR_RESET_ROUTE)}
    paths.update(v2_paths(settings, model, error_answers))
    paths[V2_INFER_ROUTE]["post"]["requestBody"]["content"]["application/json"]["example"] = infer_example()
    for route in ("/livez", "/healthz", "/readyz", "/metrics"):
        op = paths[route]["get"]
        op["responses"] = {"200": _text("OK" if route != "/metrics" else "Prometheus text exposition"),
                           **error_answers(settings, route=route, open_route=True)}
        if route == "/readyz":
            op["responses"]["503"] = _text("not ready: the model is still loading or the batcher stopped")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    schemas["ModelInfo"] = MODEL_INFO_SCHEMA
    schemas["PriorReport"] = PRIOR_REPORT_SCHEMA
    if settings.api_key is not None:
        doc["components"]["securitySchemes"] = {SECURITY_SCHEME: {
            "type": "http", "scheme": "bearer", "description": "LTSERVE_API_KEY, as `Authorization: Bearer <key>`"}}
        for route in PROTECTED_ROUTES:
            for op in paths[route].values():
                op["security"] = [{SECURITY_SCHEME: []}]
    _nullable_as_oas30(doc)
    for route, summary in SUMMARIES.items():
        for op in paths[route].values():
            op["summary"] = summary
    _drop_unused_schemas(doc)
    return doc


@lru_cache(maxsize=1)
def _example_png() -> str:
    """A real image for the examples, base64: a 28 x 28 grey gradient as PNG (~100 bytes; any model's
    preprocessing resizes it and converts its channels)."""
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((28, 28)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def infer_example() -> dict[str, Any]:
    """The example body of `POST /v2/models/{model}/infer` that "Try it out" sends: one PNG in `data`, and the top 3
    asked as 'score:index:label' strings (the `classification` extension)."""
    return {"inputs": [{"name": INPUT, "shape": [1], "datatype": "BYTES", "data": [_example_png()]}],
            "outputs": [{"name": OUTPUT, "parameters": {"classification": 3}}]}


SUMMARIES = {
    CLASSIFY_ROUTE: "Classify one image (multipart field `image`)",
    BATCH_ROUTE: "Classify several images (repeated multipart field `images`)",
    RAW_ROUTE: "Classify one image sent as the request body",
    MODEL_ROUTE: "The served model: labels, shot groups, head, metrics, runtime",
    PRIOR_ROUTE: "The live class prior of the traffic (label shift)",
    PRIOR_RESET_ROUTE: "Forget the traffic seen so far: back to the package's prior",
    "/livez": "Liveness", "/healthz": "Health", "/readyz": "Readiness (the model is loaded and warm)",
    "/metrics": "Prometheus metrics",
}


def _nullable_as_oas30(node: Any) -> None:
    """pydantic writes an optional field as `anyOf: [X, {"type": "null"}]` (JSON Schema); the document is OpenAPI
    3.0, which has no "null" type (validators drop it and then refuse null), so write it as X with `nullable: true`."""
    if isinstance(node, dict):
        options = node.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del node["anyOf"]
            if len(rest) == 1 and "$ref" not in rest[0]:
                node.update(rest[0])
            else:
                node["anyOf"] = rest
            node["nullable"] = True
        for value in node.values():
            _nullable_as_oas30(value)
    elif isinstance(node, list):
        for value in node:
            _nullable_as_oas30(value)


def _drop_unused_schemas(doc: dict[str, Any]) -> None:
    """Remove component schemas no path refers to (BentoML's task, 404 and 500 bodies), directly or through
    another schema."""
    schemas = doc["components"]["schemas"]
    used: set[str] = set()
    todo = [doc["paths"]]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(SCHEMAS) and ref[len(SCHEMAS):] not in used:
                name = ref[len(SCHEMAS):]
                used.add(name)
                todo.append(schemas.get(name))
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    for name in list(schemas):
        if name not in used:
            del schemas[name]
