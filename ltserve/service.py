"""The BentoML service: image classification over HTTP on a model package (`bentoml serve` from the repo root).

    POST /classify        multipart field `image`  -> Prediction (top-k)
    POST /classify_batch  repeated field `images`  -> {"predictions": [Prediction, ...]} (at most max_batch_images)
    GET  /model           labels, shot groups, head, metrics, provenance, runtime
    GET  /livez /readyz /metrics (Prometheus: BentoML's, plus predictions per shot group and batch sizes run)

Configuration comes from LTSERVE_* environment variables, or a YAML file named by LTSERVE_CONFIG with the same
fields (environment variables win); see `ServiceSettings`.

Request path (chosen by measurement, benchmarks/serve_load.py; numbers in its results): one process, and an
in-process batcher. `RequestGuard` (ASGI middleware) reads and checks every upload request, answering each client
mistake with a 4xx JSON body {"error", "detail"}: API key, content type, body size (Content-Length and streamed
bytes), the multipart body and its fields, text or URL strings in a file field (never fetched: BentoML's own parser
would download a URL given there), the batch cap. It then hands the files' bytes to `Classifier.answer`, so the body
is parsed once and no temporary file is written (BentoML's handler would parse it again and spool every upload to
disk: measured ~0.6-0.9 ms more server CPU per request on 2 cores). The `@bentoml.api` methods declare the same
routes for the OpenAPI page and `bentoml.SyncHTTPClient`, and run the same `answer`. `AsyncPredictor`
(ltserve.inference) decodes in a thread pool and batches concurrent requests into one ONNX Runtime call (an asyncio
queue, one batch at a time): a lone request runs at once, and batches grow while the previous one runs. It beat a
batchable BentoML API behind a front service (`bentoml.depends`), which adds an inter-process hop per request.
Model logic lives in ltserve.inference; this file wires HTTP to it.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import Any, Literal

import bentoml
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ltserve.errors import ConfigError, InvalidInput, LtserveError, PackageError
from ltserve.inference import AsyncPredictor, Prediction, Predictor
from ltserve.package import load_package
from ltserve.preprocess import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

ENV_PREFIX = "LTSERVE_"
CLASSIFY_ROUTE = "/classify"
BATCH_ROUTE = "/classify_batch"
MODEL_ROUTE = "/model"
UPLOAD_FIELDS = {CLASSIFY_ROUTE: "image", BATCH_ROUTE: "images"}
PROTECTED_ROUTES = (CLASSIFY_ROUTE, BATCH_ROUTE, MODEL_ROUTE)


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------


class ServiceSettings(BaseModel):
    """Service configuration: LTSERVE_<FIELD> environment variables, or LTSERVE_CONFIG (a YAML file of these fields).

    Attributes:
        model: model package folder, relative to the working directory (LTSERVE_MODEL).
        top_k: classes listed per image (LTSERVE_TOP_K).
        max_upload_bytes: largest request body; larger answers 413 (LTSERVE_MAX_UPLOAD_BYTES).
        max_pixels: largest image, width * height, checked before decoding; larger answers 413 (LTSERVE_MAX_PIXELS).
        max_batch_images: most images in one /classify_batch request; more answers 413 (LTSERVE_MAX_BATCH_IMAGES).
        timeout_s: a request taking longer answers 504 (LTSERVE_TIMEOUT_S).
        providers: ONNX Runtime providers, comma separated, best first, e.g. "cuda,cpu" (LTSERVE_PROVIDERS;
            default: the best available).
        backend: "onnxruntime" (default) or "torch": the package's model.pt2 through PyTorch, for GPU machines
            without onnxruntime-gpu (LTSERVE_BACKEND; bentofile.torch.yaml sets it).
        threads: ONNX Runtime CPU threads (LTSERVE_THREADS; default: all cores).
        max_batch_size: most images per model call across concurrent requests; 1 turns adaptive batching off
            (LTSERVE_MAX_BATCH_SIZE).
        max_latency_ms: longest a request waits in the queue for companions (LTSERVE_MAX_LATENCY_MS).
        decode_threads: threads decoding uploads (LTSERVE_DECODE_THREADS; default: every core when the model runs
            on a GPU, whose cores have nothing else to run; else min(4, cores), leaving the rest to inference).
        api_key: when set, /classify, /classify_batch and /model need `Authorization: Bearer <key>`
            (LTSERVE_API_KEY). Health and metrics routes stay open for probes and scrapers.
        cors_origins: origins allowed by CORS, comma separated; empty = CORS off (LTSERVE_CORS_ORIGINS).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Path("models/fashion-lt")
    top_k: int = Field(5, ge=1, le=1000)
    max_upload_bytes: int = Field(10 * 2**20, ge=1024)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_batch_images: int = Field(64, ge=1)
    timeout_s: float = Field(30.0, gt=0)
    providers: list[str] | None = None
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    threads: int | None = Field(None, ge=1)
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_latency_ms: float = Field(5.0, ge=0, le=10_000)
    decode_threads: int | None = Field(None, ge=1, le=1024)
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("providers", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServiceSettings":
        """Settings from LTSERVE_CONFIG (YAML) overlaid with LTSERVE_<FIELD> variables.

        Raises:
            ConfigError: the YAML file is missing or invalid, or a value is invalid (names the variable or key).
        """
        env = dict(os.environ if environ is None else environ)
        raw: dict[str, Any] = {}
        source = "environment"
        if env.get(ENV_PREFIX + "CONFIG"):
            path = Path(env[ENV_PREFIX + "CONFIG"])
            source = f"{path} and environment"
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except FileNotFoundError:
                raise ConfigError(f"LTSERVE_CONFIG={path}: file not found") from None
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"LTSERVE_CONFIG={path}: cannot read it as YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"LTSERVE_CONFIG={path}: expected a mapping of settings "
                                  f"({', '.join(cls.model_fields)})")
        for name in cls.model_fields:
            value = env.get(ENV_PREFIX + name.upper())
            if value is not None and value != "":
                raw[name] = value
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            lines = [f"invalid service settings ({source}):"]
            for e in exc.errors():
                key = str(e["loc"][0]) if e["loc"] else "?"
                where = f"{ENV_PREFIX}{key.upper()} / {key}" if key in cls.model_fields else key
                valid = "" if key in cls.model_fields else f" (valid: {', '.join(cls.model_fields)})"
                lines.append(f"  {where}: {e['msg']}{valid}")
            raise ConfigError("\n".join(lines)) from None

    def model_path(self) -> Path:
        """The model package folder, absolute (relative paths are resolved from the working directory)."""
        return self.model.expanduser().resolve()


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body of this service: {"error": short code, "detail": what is wrong and how to fix it}."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


_ERROR_CODES = {400: "invalid_image", 413: "image_too_large", 415: "unsupported_format"}


def invalid_input_response(exc: InvalidInput) -> JSONResponse:
    """Map ltserve's input errors (InvalidImage 400, ImageTooLarge 413, UnsupportedFormat 415) to JSON."""
    return error_response(exc.status_code, _ERROR_CODES.get(exc.status_code, "invalid_input"), str(exc))


# ---------------------------------------------------------------------------------------------------------------------
# Request guard (ASGI middleware): everything a client can get wrong, answered 4xx before BentoML parses
# ---------------------------------------------------------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class RequestGuard:
    """Checks API key, content type, body size and the multipart fields of the upload routes, then answers them.

    The body is read here (counting streamed bytes against max_upload_bytes, whatever Content-Length says), parsed
    once and checked; the files' bytes go to the service's `answer`. A string in a file field (BentoML would fetch
    a URL given there) is refused, so nothing is ever fetched. Before the service instance exists, the checked body
    is replayed to BentoML's own handler instead.
    """

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings
        self._key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        try:
            if self._key is not None and path in PROTECTED_ROUTES and scope.get("method") != "OPTIONS":
                self._check_key(scope)
            if path in UPLOAD_FIELDS and scope.get("method") == "POST":
                body = await self._read_body(scope, receive)
                files = await self._check_form(scope, body, UPLOAD_FIELDS[path])
                service = _current.get("service")
                if service is not None:  # answer here: see the module docstring (one parse, no temporary files)
                    response = await service.answer(path, files)
                    return await response(scope, receive, send)
                receive = _replay(body)
        except _Reject as r:
            headers = {"WWW-Authenticate": 'Bearer realm="ltserve"'} if r.status == 401 else None
            if r.status == 413:
                headers = {"Connection": "close"}  # the rest of an oversized body is not read
            return await error_response(r.status, r.error, r.detail, headers)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check_key(self, scope: dict) -> None:
        auth = _header(scope, b"authorization")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise _Reject(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`")

    async def _read_body(self, scope: dict, receive: Any) -> bytes:
        limit = self.settings.max_upload_bytes
        too_big = _Reject(413, "payload_too_large", f"request body exceeds {limit} bytes (LTSERVE_MAX_UPLOAD_BYTES)")
        length = _header(scope, b"content-length")
        if length:
            if not length.isdigit():
                raise _Reject(400, "bad_request", f"invalid Content-Length {length!r}")
            if int(length) > limit:
                raise too_big
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reject(400, "bad_request", "client disconnected before the body was complete")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:  # chunked uploads, or a Content-Length that lied
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, scope: dict, body: bytes, field: str) -> list[bytes]:
        """Parse the multipart body and check its fields; the uploaded files' bytes, in order."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException

        ctype = _header(scope, b"content-type")
        media = ctype.split(";")[0].strip().lower()
        example = f"curl -F {field}=@photo.jpg URL"
        if not body:
            raise _Reject(400, "empty_body", f"the request body is empty; send multipart/form-data with a file in "
                                             f"field {field!r} ({example})")
        if media != "multipart/form-data":
            raise _Reject(415, "unsupported_media_type", f"Content-Type {ctype or '(missing)'!r} is not accepted; send "
                                                         f"multipart/form-data with a file in field {field!r} "
                                                         f"({example})")
        request = Request({k: v for k, v in scope.items() if k != "app"}, _replay(body))  # no "app": Starlette
        try:                                                                       # then raises MultiPartException
            form = await request.form(max_files=1000, max_fields=100)
        except MultiPartException as exc:
            status = 413 if "Too many files" in exc.message else 400
            raise _Reject(status, "bad_multipart", f"cannot parse the multipart body: {exc.message}") from None
        except Exception as exc:  # any other parser failure is still a malformed body, not a server fault
            raise _Reject(400, "bad_multipart", f"cannot parse the multipart body: {exc}") from None
        try:
            keys = set(form.keys())
            values = form.getlist(field)
            files = [v for v in values if isinstance(v, UploadFile)]
            extra = sorted(keys - {field})
            if not values:
                raise _Reject(400, "missing_field", f"no file in field {field!r} (got fields {sorted(keys)}); "
                                                    f"{example}")
            if len(files) != len(values):
                raise _Reject(400, "not_a_file", f"field {field!r} must hold uploaded files, but it holds text "
                                                 "(URLs are never fetched: upload the image bytes)")
            if extra:
                raise _Reject(400, "unknown_field", f"unexpected field(s) {extra}; only {field!r} is accepted")
            if field == "image" and len(files) > 1:
                raise _Reject(400, "too_many_files", f"/classify takes one image, got {len(files)}; use "
                                                     f"{BATCH_ROUTE} with repeated field 'images'")
            cap = self.settings.max_batch_images
            if len(files) > cap:
                raise _Reject(413, "too_many_images", f"{len(files)} images in one request; at most {cap} "
                                                      "(LTSERVE_MAX_BATCH_IMAGES)")
            return [await f.read() for f in files]
        finally:
            await form.close()


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and GET /model
# ---------------------------------------------------------------------------------------------------------------------

_METRICS: dict[str, Any] = {}


def service_metrics() -> dict[str, Any]:
    """This process's Prometheus metrics: predictions per shot group, and the batch sizes actually run.

    Created on first use inside the worker: prometheus_client must be imported after BentoML has set up its
    multiprocess directory, so that /metrics aggregates them with BentoML's own.
    """
    if not _METRICS:
        import prometheus_client

        _METRICS["predictions"] = prometheus_client.Counter(
            "ltserve_predictions", "Images classified, by the shot group of the predicted class", ["shot_group"])
        _METRICS["batch_size"] = prometheus_client.Histogram(
            "ltserve_batch_size", "Images per model call (adaptive batching across requests)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024))
    return _METRICS


_current: dict[str, Any] = {}  # the service instance of this worker process, for the mounted ASGI routes


async def _model_info(request: Request) -> JSONResponse:
    svc = _current.get("service")
    if svc is None:
        return error_response(503, "not_ready", "the model is still loading")
    return JSONResponse(svc.info)


routes_app = Starlette(routes=[Route(MODEL_ROUTE, _model_info, methods=["GET"])])

# ---------------------------------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------------------------------

SETTINGS = ServiceSettings.from_env()


class BatchResponse(BaseModel):
    """/classify_batch: one prediction per uploaded image, in upload order."""

    predictions: list[Prediction]


@bentoml.asgi_app(routes_app, path="/")
@bentoml.service(name="ltserve", workers=1, traffic={"timeout": SETTINGS.timeout_s})
class Classifier:
    """Classifies images with the model package named by LTSERVE_MODEL (default models/fashion-lt)."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.metrics = service_metrics()
        path = self.settings.model_path()
        try:
            predictor = Predictor(path, providers=self.settings.providers, threads=self.settings.threads,
                                  max_batch_size=self.settings.max_batch_size, backend=self.settings.backend)
        except LtserveError as exc:
            logger.error("cannot start: model package %s: %s (set LTSERVE_MODEL to a package folder)", path, exc)
            raise
        self.engine = AsyncPredictor(predictor, max_batch_size=self.settings.max_batch_size,
                                     max_latency_ms=self.settings.max_latency_ms,
                                     decode_threads=self.settings.decode_threads,
                                     on_batch=self.metrics["batch_size"].observe)
        self.info = {**predictor.info(), "service": {
            "top_k": self.settings.top_k, "max_upload_bytes": self.settings.max_upload_bytes,
            "max_pixels": self.settings.max_pixels, "max_batch_images": self.settings.max_batch_images,
            "max_batch_size": self.settings.max_batch_size, "max_latency_ms": self.settings.max_latency_ms,
            "decode_threads": self.engine.decode_threads}}
        _current["service"] = self
        logger.info("serving %s from %s", predictor.meta.name, path)

    @bentoml.on_deployment
    def check_model() -> None:
        """Before any worker starts: a missing or broken package stops `bentoml serve` here, naming path and
        problem (a failing worker would otherwise be restarted forever)."""
        path = SETTINGS.model_path()
        try:
            # the whole Predictor (schema, sha256, graph vs model.json, warm-up) on CPU with one thread: cheap, and
            # no GPU context is left in this supervising process
            if SETTINGS.backend == "torch":  # no torch model in the supervisor: the package and its model.pt2
                meta = load_package(path)
                if "model.pt2" not in meta.files:
                    raise PackageError(f"{path}: LTSERVE_BACKEND=torch needs model.pt2; re-export with "
                                       "`ltserve export ... --format onnx,pt2`")
            else:
                Predictor(path, providers=["cpu"], threads=1, max_batch_size=1)
        except LtserveError as exc:
            raise SystemExit(f"ltserve: cannot serve model package {path}: {exc}\n(set LTSERVE_MODEL to a model "
                             "package folder, e.g. one made by `ltserve export`)") from None

    @bentoml.on_shutdown
    def close(self) -> None:
        """Stop the batching worker and the decode/predict threads."""
        self.engine.close()
        _current.pop("service", None)

    def __is_ready__(self) -> bool:
        return self.engine.running

    @bentoml.api(route=CLASSIFY_ROUTE)
    async def classify(self, image: Path) -> Prediction:
        """Classify one image (multipart field `image`: JPEG, PNG, WebP, BMP or GIF); top-k classes."""
        return await self.answer(CLASSIFY_ROUTE, [image])

    @bentoml.api(route=BATCH_ROUTE)
    async def classify_batch(self, images: list[Path]) -> BatchResponse:
        """Classify several images (repeated multipart field `images`), at most LTSERVE_MAX_BATCH_IMAGES."""
        return await self.answer(BATCH_ROUTE, images)

    async def answer(self, route: str, files: list[bytes] | list[Path]) -> Response:
        """The one handler of both upload routes: predictions as JSON, or a 4xx JSON error.

        Called by `RequestGuard` with the bytes it parsed (HTTP), or by the API methods above with BentoML's
        uploaded files (direct and in-process calls).
        """
        if route == BATCH_ROUTE and len(files) > self.settings.max_batch_images:
            cap = self.settings.max_batch_images
            return error_response(413, "too_many_images", f"{len(files)} images in one request; at most {cap} "
                                                          "(LTSERVE_MAX_BATCH_IMAGES)")
        try:
            predictions = await self.engine.classify(files, self.settings.top_k, self.settings.max_pixels)
        except InvalidInput as exc:
            return invalid_input_response(exc)
        counter = self.metrics["predictions"]
        for p in predictions:
            counter.labels(shot_group=p.shot_group).inc()
        payload = predictions[0] if route == CLASSIFY_ROUTE else BatchResponse(predictions=predictions)
        return Response(payload.model_dump_json(), media_type="application/json")


if SETTINGS.cors_origins:
    from starlette.middleware.cors import CORSMiddleware

    # added before the guard, so it wraps it: preflights are answered here, and the guard's 4xx carry CORS headers
    Classifier.add_asgi_middleware(CORSMiddleware, allow_origins=SETTINGS.cors_origins,
                                   allow_methods=["GET", "POST", "OPTIONS"],
                                   allow_headers=["Authorization", "Content-Type"])
Classifier.add_asgi_middleware(RequestGuard, settings=SETTINGS)
