"""The OpenAPI description of the Open Inference Protocol routes (`ltserve.serve.v2`), for `complete_openapi`."""

from __future__ import annotations

from typing import Any, Callable

from ltserve.serve.settings import (V2_HEALTH_ROUTES, V2_INFER_ROUTE, V2_MODEL_READY_ROUTE, V2_MODEL_ROUTE,
                                    V2_SERVER_ROUTE, ServiceSettings)
from ltserve.serve.v2 import INPUT, OUTPUT

V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
            "description": "the Open Inference Protocol's error body"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": sorted(properties), "properties": properties}


def _infer_request(settings: ServiceSettings) -> dict[str, Any]:
    tensor = {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
        "name": {"type": "string", "enum": [INPUT]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 2,
                  "description": "[N] or [N, 1]: N images"},
        "datatype": {"type": "string", "enum": ["BYTES"]},
        "data": {"type": "array", "minItems": 1, "maxItems": settings.max_batch_images,
                 "items": {"type": "string", "format": "byte"},
                 "description": "the encoded images (JPEG, PNG, ...), base64; or leave `data` out and send them "
                                "raw after the JSON (binary-data extension: `parameters.binary_data_size`, header "
                                "Inference-Header-Content-Length)"},
        "parameters": {"type": "object"}}}
    output = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "enum": [OUTPUT]},
        "parameters": {"type": "object", "properties": {
            "classification": {"type": "integer", "minimum": 0,
                               "description": "answer the top k as 'score:index:label' strings"},
            "binary_data": {"type": "boolean"}}}}}
    return {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": tensor},
        "outputs": {"type": "array", "maxItems": 1, "items": output},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}}}}


INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"]}}}}


def v2_paths(settings: ServiceSettings, model: str,
             error_answers: Callable[..., dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The OpenAPI paths of the protocol's routes for the served `model` (its name is the only valid one)."""
    name = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string", "enum": [model]}}]
    unknown = {"404": _json(V2_ERROR, "no such model on this server")}

    def op(route: str, summary: str, answers: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"tags": ["Open Inference Protocol (KServe v2)"], "summary": summary,
                "operationId": "v2_" + route.strip("/").replace("/", "_").replace("{", "").replace("}", ""),
                "responses": {**answers, **error_answers(settings, route=route, open_route=route in V2_HEALTH_ROUTES)},
                **extra}

    live, ready = V2_HEALTH_ROUTES
    return {
        live: {"get": op(live, "Server liveness", {"200": _json(_object(live={"type": "boolean"}), "live")})},
        ready: {"get": op(ready, "Server readiness", {
            "200": _json(_object(ready={"type": "boolean"}), "ready"),
            "503": _json(_object(ready={"type": "boolean"}), "not ready: the model is still loading")})},
        V2_SERVER_ROUTE: {"get": op(V2_SERVER_ROUTE, "Server metadata", {"200": _json(_object(
            name={"type": "string"}, version={"type": "string"},
            extensions={"type": "array", "items": {"type": "string"}}), "server metadata")})},
        V2_MODEL_ROUTE: {"get": op(V2_MODEL_ROUTE, "Model metadata: its input and output tensors", {
            "200": _json({"type": "object", "required": ["name", "inputs", "outputs"]}, "model metadata"),
            **unknown}, parameters=name)},
        V2_MODEL_READY_ROUTE: {"get": op(V2_MODEL_READY_ROUTE, "Model readiness", {
            "200": _json(_object(name={"type": "string"}, ready={"type": "boolean"}), "readiness"), **unknown},
            parameters=name)},
        V2_INFER_ROUTE: {"post": op(V2_INFER_ROUTE, "Classify encoded images (BYTES): probabilities (FP32 [N, C])", {
            "200": {"description": "the outputs: JSON, or JSON then raw bytes (binary-data extension: "
                                   "application/octet-stream, header Inference-Header-Content-Length)",
                    "content": {"application/json": {"schema": INFER_RESPONSE},
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "400": _json(V2_ERROR, "a malformed request, or an image that cannot be decoded"),
            **unknown,
            "413": _json(V2_ERROR, f"more than {settings.max_batch_images} images (LTSERVE_MAX_BATCH_IMAGES), more "
                                   "pixels than allowed, or a body over LTSERVE_MAX_UPLOAD_BYTES"),
            "415": _json(V2_ERROR, "an image format that is not accepted")},
            parameters=name, requestBody={"required": True, "content": {
                "application/json": {"schema": _infer_request(settings)}}})},
    }
