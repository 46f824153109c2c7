"""The BentoML service: image classification over HTTP on a model package (`bentoml serve` from the repo root).

    POST /classify        multipart field `image`  -> Prediction (top-k)
    POST /classify_batch  repeated field `images`  -> {"predictions": [Prediction, ...]} (at most max_batch_images)
    POST /classify_raw    the image bytes as the body (Content-Type image/jpeg, image/png, ... or
                          application/octet-stream) -> Prediction, as /classify for the same image
    GET  /model           precision, labels, shot groups, JPEG draft on/off, head, metrics, verification, provenance,
                          runtime
    GET  /prior           the live class prior estimated from the traffic (LTSERVE_PRIOR_ADAPT=report | apply)
    POST /prior/reset     forget the traffic seen so far, in every worker: back to the package's target prior
    GET  /docs.json       the OpenAPI contract: every route, every status, the Bearer scheme (ltserve.serve.openapi)
    GET  /livez /readyz /metrics, / (BentoML's: health, Prometheus, the Swagger page)

Configuration: `ServiceSettings` (ltserve.serve.settings), read once at import from LTSERVE_<FIELD> environment
variables over the YAML file named by LTSERVE_CONFIG; the library below gets plain arguments.

How a request runs. BentoML is the server: `bentoml serve`, the bentofile, its supervisor and worker processes
(ltserve.serve.worker: 2 workers on CPU), health, metrics and the documentation page. ltserve's routes are answered
by `Front` (ltserve.serve.http), a plain ASGI app that BentoML's app is built behind
(`bentoml_seam.front_service`): one read of the body, one multipart parse (ltserve.serve.multipart), no file on
disk, each image header read once, decode, adaptive batching across requests (ltserve.serve.batcher), then
predict -> logits -> live prior (ltserve.serve.live_prior: observed on the request path, re-estimated in a
background thread) -> answer. One handler per route (the `_route_*` functions below); the `@bentoml.api` methods
are the same answers for direct Python calls (`await Classifier().classify(image=path)`), and they give BentoML the
typed contract it documents at /docs.json and that `bentoml.SyncHTTPClient` calls. Why not BentoML's own request
path: its typed API layer parses every body again into arguments and writes uploads to temporary files, and its
middlewares wrap every route (mounted apps too): measured on the 2-core box, 3.0-3.8x the server CPU per request
of a bare uvicorn + Starlette server doing the same work; this path measures 0.89-1.00x of it
(`benchmarks/serve_overhead.py`, results in benchmarks/results/cpu-x86_64-2c/serve_overhead/).

Errors are `ErrorBody` JSON ({"error", "detail"}) with a 4xx status: API key 401, body over LTSERVE_MAX_UPLOAD_BYTES
413, a malformed form 400, wrong media type 415, a file that is not a usable image 400/413/415, time limit 504;
the connection layer (ltserve.serve.connection, enforced by the seam's protocol) adds 408 and 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, SerializeAsAny

import ltserve
from ltserve.errors import InvalidInput, LtserveError, PackageError
from ltserve.package import load_package
from ltserve.runtime import Prediction, Predictor
from ltserve.runtime.prior import PackagePrior, check_method
from ltserve.metrics import softmax
from ltserve.serve import bentoml_seam, v2
from ltserve.serve.batcher import AsyncPredictor
from ltserve.serve.docs_page import CONTENT_SECURITY_POLICY, docs_page
from ltserve.serve.http import (Answer, ErrorBody, Front, HttpRequest, Reject, Route, StarletteRoutes, error_answer,
                                json_answer)
from ltserve.serve.uploads import input_error_answer, read_form
from ltserve.serve.live_prior import LivePrediction, live_prior_from_settings, prior_metrics
from ltserve.serve.metrics import count_unmatched, record_request, service_metrics
from ltserve.serve.openapi import complete_openapi
from ltserve.serve.settings import (BATCH_ROUTE, CLASSIFY_ROUTE, MODEL_ROUTE, PRIOR_RESET_ROUTE, PRIOR_ROUTE,
                                    RAW_MEDIA_TYPES, RAW_ROUTE, V2_HEALTH_ROUTES, V2_INFER_ROUTE, V2_MODEL_READY_ROUTE,
                                    V2_MODEL_ROUTE, V2_SERVER_ROUTE, ServiceSettings)
from ltserve.serve.worker import cpu_threads, prepare_server, setup_worker, worker_count

logger = logging.getLogger(__name__)

bentoml_seam.check_versions()
SETTINGS = ServiceSettings.from_env()
WORKERS = worker_count(SETTINGS)
if bentoml.server_context.worker_index is not None:  # a `bentoml serve` worker, before its HTTP server starts
    setup_worker(SETTINGS)

# What a direct Python call of an API method gets as `ctx`: a context whose `response` exists only inside an HTTP
# request (BentoML keeps the request's response in a context variable), so `_python_answer` sets no status then.
NO_REQUEST = bentoml.Context()


# With live label shift on, answers are LivePredictions (a Prediction plus "adapted"): the 200 schemas say so.
ANSWER = Prediction if SETTINGS.prior_adapt == "off" else LivePrediction


class BatchResponse(BaseModel):
    """/classify_batch: one prediction per uploaded image, in upload order."""

    predictions: list[SerializeAsAny[ANSWER]]  # type: ignore[valid-type]  # SerializeAsAny: keep "adapted"


# BentoML's time limit guards its own routes; ltserve's routes have theirs in `Front` (504 ErrorBody), 1 s earlier.
@bentoml.service(name="ltserve", workers=WORKERS, traffic={"timeout": SETTINGS.timeout_s + 1})
class Classifier:
    """Classifies images with the model package named by LTSERVE_MODEL (default models/fashion-lt)."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.metrics = service_metrics()
        path = self.settings.model_path()
        try:
            self.predictor = Predictor(path, providers=self.settings.providers,
                                       threads=cpu_threads(self.settings, WORKERS),
                                       max_batch_size=self.settings.max_batch_size, backend=self.settings.backend,
                                       torch_options=self.settings.torch_options(), open_set=self.settings.open_set)
        except LtserveError as exc:
            logger.error("cannot start: model package %s: %s (set LTSERVE_MODEL to a package folder)", path, exc)
            raise
        worker = bentoml.server_context.worker_index
        self.prior = live_prior_from_settings(self.settings, self.predictor.meta,
                                              str(worker) if worker is not None else f"pid{os.getpid()}",
                                              prior_metrics())
        self.engine = AsyncPredictor(self.predictor, max_batch_size=self.settings.max_batch_size,
                                     max_latency_ms=self.settings.max_latency_ms,
                                     inline_model_ms=self.settings.inline_model_ms,
                                     decode_threads=self.settings.decode_threads,
                                     on_batch=self.metrics["batch_size"].observe)
        self.info = {**self.predictor.info(), "service": {
            "top_k": self.settings.top_k, "max_upload_bytes": self.settings.max_upload_bytes,
            "max_pixels": self.settings.max_pixels, "max_request_pixels": self.settings.max_request_pixels,
            "max_batch_images": self.settings.max_batch_images,
            "max_batch_size": self.settings.max_batch_size, "max_latency_ms": self.settings.max_latency_ms,
            "decode_threads": self.engine.decode_threads, "workers": WORKERS, "pid": os.getpid(),
            "prior_adapt": self.settings.prior_adapt,
            **(self.prior.model_info() if self.prior else {})}}
        logger.info("serving %s from %s", self.predictor.meta.name, path)

    @bentoml.on_deployment
    def check_model() -> None:
        """Before any worker starts: a missing or broken package stops `bentoml serve` here, naming path and
        problem (a failing worker would otherwise be restarted forever); then this server's own metrics directory
        (`prepare_server`)."""
        path = SETTINGS.model_path()
        try:
            # the whole Predictor (schema, sha256, graph vs model.json, warm-up) on CPU with one thread: cheap, and
            # no GPU context is left in this supervising process
            if SETTINGS.backend == "torch":  # no torch model in the supervisor: the package and its model.pt2
                meta = load_package(path)
                if "model.pt2" not in meta.files:
                    raise PackageError(f"{path}: LTSERVE_BACKEND=torch needs model.pt2; re-export with "
                                       "`ltserve export ... --model-format onnx,pt2`")
            else:
                meta = Predictor(path, providers=["cpu"], threads=1, max_batch_size=1).meta
            if SETTINGS.prior_adapt != "off":
                check_method(SETTINGS.prior_method, PackagePrior.from_meta(meta), "LTSERVE_PRIOR_METHOD")
        except LtserveError as exc:
            raise SystemExit(f"ltserve: cannot serve model package {path}: {exc}\n(set LTSERVE_MODEL to a model "
                             "package folder, e.g. one made by `ltserve export`)") from None
        prepare_server(SETTINGS)

    @bentoml.on_shutdown
    def close(self) -> None:
        """Stop the batching worker and the decode/predict threads; write the live prior's state."""
        self.engine.close()
        if self.prior is not None:
            self.prior.close()

    def __is_ready__(self) -> bool:
        return self.engine.running

    async def predictions(self, files: Sequence[bytes]) -> list[Prediction]:
        """What every classify route answers: decode, batch, predict -> logits -> live prior -> top-k (and, with
        open-set rejection on, `unknown` and `ood_score`).

        Raises:
            InvalidInput: a file is not a usable image, or the files are over the pixel budget.
        """
        logits, features, raw = await self.outputs(files)
        if self.prior is None:
            predictions = self.predictor.postprocess(logits, self.settings.top_k, features=features)
        else:  # open-set scores from the model's own logits, whatever the live prior shifted
            predictions = self.predictor.postprocess(logits, self.settings.top_k, LivePrediction, features=features,
                                                     scored_logits=raw, adapted=logits is not raw)
        for p in predictions:
            group = p.top_k[0].shot_group  # the top class's, also for an image rejected as unknown
            self.metrics["predictions"].labels(shot_group=group).inc()
            if p.unknown:
                self.metrics["unknown"].labels(shot_group=group).inc()
        return predictions

    async def outputs(self, files: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The served logits (N, C) of `files` (decode, batch, predict, then the live prior's shift with apply), the
        penultimate features (N, D) when the package's graph gives them (else None), and the model's own logits
        (the same array when nothing was shifted).

        Raises:
            InvalidInput: as `predictions`.
        """
        raw, features = await self.engine.outputs_of(files, self.settings.max_pixels,
                                                     self.settings.max_request_pixels)
        if self.prior is None:
            return raw, features, raw
        logits, adapted = self.prior.adapt(raw)
        return (logits if adapted else raw), features, raw

    # -- the Python API: the same answers for direct calls; BentoML documents it and SyncHTTPClient calls it --------

    @bentoml.api(route=CLASSIFY_ROUTE, output_spec=ANSWER)  # the 200 schema: BentoML's generator fails on a union
    async def classify(self, image: Path, ctx: bentoml.Context = NO_REQUEST) -> Prediction | ErrorBody:
        """Classify one image (JPEG, PNG, WebP, BMP, GIF, TIFF or PNM): its top-k classes, or an ErrorBody
        (400 not a decodable image, 413 more than LTSERVE_MAX_PIXELS pixels, 415 a format not accepted)."""
        return await _python_answer(self, [image], ctx, lambda p: p[0])

    @bentoml.api(route=RAW_ROUTE, output_spec=ANSWER)
    async def classify_raw(self, image: bytes, /, ctx: bentoml.Context = NO_REQUEST) -> Prediction | ErrorBody:
        """Classify one image sent as the request body (`Content-Type: image/jpeg`, another image type, or
        application/octet-stream): the cheapest request, with the answers and errors of `classify`."""
        return await _python_answer(self, [image], ctx, lambda p: p[0])

    @bentoml.api(route=BATCH_ROUTE, output_spec=BatchResponse)
    async def classify_batch(self, images: list[Path],
                             ctx: bentoml.Context = NO_REQUEST) -> BatchResponse | ErrorBody:
        """Classify several images (repeated field `images`, at most LTSERVE_MAX_BATCH_IMAGES), in upload order;
        or an ErrorBody: 413 for too many images or pixels (checked before decoding), else as `classify` for the
        first unusable image (its detail starts with `images[i]:`)."""
        cap = self.settings.max_batch_images
        if len(images) > cap:
            return _with_status(ctx, 413, ErrorBody(error="too_many_images", detail=(
                f"{len(images)} images in one request; at most {cap} (LTSERVE_MAX_BATCH_IMAGES)")))
        return await _python_answer(self, images, ctx, lambda p: BatchResponse(predictions=p))


async def _python_answer(svc: Classifier, files: Sequence[bytes | Path], ctx: bentoml.Context, wrap) -> BaseModel:
    """A direct call's answer: `wrap(predictions)`, or the ErrorBody of the first unusable file."""
    data = [f if isinstance(f, bytes) else await asyncio.to_thread(Path(f).read_bytes) for f in files]
    try:
        return wrap(await svc.predictions(data))
    except InvalidInput as exc:
        answer = input_error_answer(exc)
        return _with_status(ctx, answer.status, ErrorBody.model_validate_json(answer.body))


def _with_status(ctx: bentoml.Context, status: int, body: ErrorBody) -> ErrorBody:
    """`body`, with the HTTP status of the answer set to `status` when called for an HTTP request."""
    with contextlib.suppress(LookupError):  # a direct Python call: there is no HTTP answer to set
        ctx.response.status_code = status
    return body


# ---------------------------------------------------------------------------------------------------------------------
# The HTTP routes: one handler each, run by `Front`
# ---------------------------------------------------------------------------------------------------------------------


def _instance() -> Classifier:
    """This worker's service instance (BentoML sets it once built)."""
    try:
        return bentoml.get_current_service()
    except BentoMLException:  # the worker is still building the instance
        raise Reject(503, "not_ready", "the model is still loading") from None


async def _classify_files(files: list[bytes], wrap) -> Answer:
    try:
        return json_answer(wrap(await _instance().predictions(files)))
    except InvalidInput as exc:
        return input_error_answer(exc)


async def _route_classify(request: HttpRequest) -> Answer:
    parts = read_form(request, "image", 1, "curl -F image=@photo.jpg URL")
    return await _classify_files([parts[0].data], lambda p: p[0])


async def _route_classify_batch(request: HttpRequest) -> Answer:
    parts = read_form(request, "images", SETTINGS.max_batch_images, "curl -F images=@a.jpg -F images=@b.jpg URL")
    return await _classify_files([p.data for p in parts], lambda p: BatchResponse(predictions=p))


async def _route_classify_raw(request: HttpRequest) -> Answer:
    ctype = request.header("content-type")
    example = f"curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg URL{RAW_ROUTE}"
    if not request.body:
        raise Reject(400, "empty_body", f"the request body is empty; send the image bytes as the body ({example})")
    if ctype.split(";")[0].strip().lower() not in RAW_MEDIA_TYPES:
        raise Reject(415, "unsupported_media_type", (
            f"Content-Type {ctype or '(missing)'!r} is not accepted on {RAW_ROUTE}; send the bytes of an image with "
            f"its type ({', '.join(RAW_MEDIA_TYPES)}) ({example})"))
    return await _classify_files([request.body], lambda p: p[0])


async def _route_model(request: HttpRequest) -> Answer:
    return json_answer(_instance().info)


async def _route_prior(request: HttpRequest) -> Answer:
    prior = _instance().prior
    if prior is None:
        return error_answer(404, "prior_off", "live label-shift estimation is off (LTSERVE_PRIOR_ADAPT=off); set "
                                              "LTSERVE_PRIOR_ADAPT=report or apply")
    # off the event loop: a report merges the other workers' files; a reset writes one
    return json_answer(await asyncio.to_thread(prior.reset if request.path == PRIOR_RESET_ROUTE else prior.report))


_OPENAPI: dict = {}


async def _route_openapi(request: HttpRequest) -> Answer:
    if not _OPENAPI:
        _OPENAPI.update(complete_openapi(Classifier.openapi_spec.asdict(), SETTINGS, ltserve.__version__,
                                         _instance().predictor.meta.name))
    return json_answer(_OPENAPI)


async def _route_v2_health(request: HttpRequest) -> Answer:
    if request.path.endswith("/live"):
        return json_answer({"live": True})
    ready = _instance().engine.running
    return json_answer({"ready": ready}, 200 if ready else 503)


async def _route_v2_server(request: HttpRequest) -> Answer:
    return json_answer({"name": "ltserve", "version": ltserve.__version__,
                        "extensions": ["binary_tensor_data", "classification"]})


def _v2_model(request: HttpRequest) -> Classifier:
    """The instance, when the path names this server's model (else the protocol's 404)."""
    svc = _instance()
    if request.params["model"] != svc.predictor.meta.name:
        raise _v2_error(404, f"unknown model {request.params['model']!r}; this server serves "
                             f"{svc.predictor.meta.name!r}")
    return svc


def _v2_error(status: int, message: str) -> Reject:
    reject = Reject(status, "", message)
    reject.answer = Answer(status, v2.error_body(message))
    return reject


async def _route_v2_model(request: HttpRequest) -> Answer:
    svc = _v2_model(request)
    if request.path.endswith("/ready"):
        return json_answer({"name": svc.predictor.meta.name, "ready": svc.engine.running})
    platform = "pytorch" if SETTINGS.backend == "torch" else "onnxruntime_onnx"
    return json_answer(v2.metadata(svc.predictor.meta.name, svc.predictor.num_classes, platform))


async def _route_v2_infer(request: HttpRequest) -> Answer:
    svc = _v2_model(request)
    try:
        infer = v2.parse_infer(request.body, request.header(v2.HEADER_LENGTH), SETTINGS.max_batch_images)
        logits, _, _ = await svc.outputs(infer.images)
    except v2.V2Error as exc:
        raise _v2_error(exc.status, str(exc)) from None
    except InvalidInput as exc:
        raise _v2_error(exc.status_code, str(exc)) from None
    body, headers = v2.encode_infer(svc.predictor.meta.name, infer, softmax(logits), svc.predictor.labels)
    return Answer(200, body, [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                  b"application/octet-stream" if headers else b"application/json")


async def _route_docs_page(request: HttpRequest) -> Answer:
    page = docs_page(f"ltserve: {_instance().predictor.meta.name}")
    return Answer(200, page, [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())],
                  b"text/html; charset=utf-8")


ROUTES = (
    Route(("POST",), CLASSIFY_ROUTE, _route_classify),
    *(Route(("GET",), path, _route_docs_page, protected=False) for path in ("/", "/docs")),
    Route(("POST",), BATCH_ROUTE, _route_classify_batch),
    Route(("POST",), RAW_ROUTE, _route_classify_raw),
    Route(("GET",), MODEL_ROUTE, _route_model),
    Route(("GET",), PRIOR_ROUTE, _route_prior),
    Route(("POST",), PRIOR_RESET_ROUTE, _route_prior),
    Route(("GET",), "/docs.json", _route_openapi, protected=False),
    *(Route(("GET",), path, _route_v2_health, protected=False) for path in V2_HEALTH_ROUTES),
    Route(("GET",), V2_SERVER_ROUTE, _route_v2_server),
    Route(("GET",), V2_MODEL_ROUTE, _route_v2_model),
    Route(("GET",), V2_MODEL_READY_ROUTE, _route_v2_model),
    Route(("POST",), V2_INFER_ROUTE, _route_v2_infer),
)


def _front(bentoml_app: object) -> object:
    """The app a worker (or `to_asgi()`) serves: `Front` with ltserve's routes before BentoML's app, inside CORS
    when origins are configured (so that 4xx answers carry CORS headers too)."""
    key = SETTINGS.api_key.get_secret_value() if SETTINGS.api_key else None
    app = Front(bentoml_app, ROUTES, api_key=key, max_body_bytes=SETTINGS.max_upload_bytes,
                timeout_s=SETTINGS.timeout_s, serves=StarletteRoutes(bentoml_app), on_answer=record_request,
                on_unmatched=count_unmatched)
    if not SETTINGS.cors_origins:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=SETTINGS.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                          allow_headers=["Authorization", "Content-Type"])


bentoml_seam.front_service(Classifier, _front)
