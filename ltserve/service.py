"""The BentoML service: image classification over HTTP on a model package (`bentoml serve` from the repo root).

    POST /classify        multipart field `image`  -> Prediction (top-k)
    POST /classify_batch  repeated field `images`  -> {"predictions": [Prediction, ...]} (at most max_batch_images)
    POST /classify_raw    the image bytes as the body (Content-Type image/jpeg, image/png, ... or
                          application/octet-stream) -> Prediction, as /classify for the same image
    GET  /model           precision, labels, shot groups, JPEG draft on/off, head, metrics, verification, provenance,
                          runtime
    GET  /prior           the live class prior estimated from the traffic (LTSERVE_PRIOR_ADAPT=report | apply)
    POST /prior/reset     forget the traffic seen so far, in every worker: back to the package's target prior
    GET  /livez /readyz /metrics (Prometheus: BentoML's, plus predictions per shot group and batch sizes run, and
                          the live prior's gauges)
    GET  /docs.json       the OpenAPI contract: every route, every status, the Bearer scheme (ltserve.serve.openapi)

Configuration: `ServiceSettings` (ltserve.serve.settings), read once at import from LTSERVE_<FIELD> environment
variables over the YAML file named by LTSERVE_CONFIG; the library below gets plain arguments.

Processes (ltserve.serve.worker): `bentoml serve` runs a supervisor and `WORKERS` worker processes (2 on CPU with
2+ cores), each with its own model. In each worker, before uvicorn starts, the HTTP protocol is replaced by
ltserve.serve.connection's: a deadline for receiving each request (408), a cap on open connections (503), and
unknown paths answered 404 before BentoML's path-labelled metrics. Workers exit when the supervisor dies; each
server keeps its Prometheus files in a directory of its own.

Request path: one handler per upload route, the `@bentoml.api` method. `TimeLimit` answers 504 with an ErrorBody
and closes the connection when a request takes longer than LTSERVE_TIMEOUT_S. `RequestGuard` (ASGI middleware)
answers what is wrong with the request itself with a 4xx {"error", "detail"}: API key, content type, body
size (Content-Length and streamed bytes), the multipart body and its fields, text or URL strings in a file field
(BentoML's multipart parser would download a URL given there: never fetched), two files for /classify (BentoML would
keep the first). A request that passes is replayed, already read, to BentoML's handler, which parses it into the
method's typed arguments (`image: Path`) and calls the method; HTTP, `bentoml.SyncHTTPClient`, the OpenAPI page
and direct Python calls (`await Classifier().classify(image=path)`) all run that same method.

Errors found by the method (the batch cap; bytes that are not a usable image) are return values, not exceptions:
BentoML's `api_endpoint_wrapper` (_bentoml_impl/server/app.py) answers any exception but a `BentoMLException` with
a generic 500, and a 4xx `BentoMLException` with the body `[{"error": message}]` (a list, no "detail"); a
`pydantic.ValidationError` becomes 400 with BentoML's own body. So the method returns an `ErrorBody` and sets the
status on `ctx.response` (BentoML copies it onto the answer when the method takes `ctx: bentoml.Context`); a direct
call gets the same `ErrorBody` back. The annotation says so: `-> Prediction | ErrorBody`. The 200 schema is given
as `output_spec`, because BentoML 1.4's OpenAPI generator fails on a union return type (`_flatten_field` resolves
the union's first `$ref` against an empty table: KeyError, and /docs.json answers 500).

`GET /model` is a Starlette route mounted with `@bentoml.asgi_app` (BentoML APIs are POST-only); it reaches the
worker's instance through `bentoml.get_current_service()`, which BentoML sets once the instance is built. The same
mounted app answers `GET /docs.json` (BentoML's document completed by `complete_openapi`): mounted routes come
before BentoML's own /docs.json in the route table. `/prior` and `/prior/reset` are mounted the same way.

Live label shift (`ltserve.serve.live_prior`): with LTSERVE_PRIOR_ADAPT=report (the default) or apply, the batcher is
handed an `AdaptingPredictor`, whose `postprocess` feeds each request's unadapted logits to the worker's
`LivePrior` and, with apply, answers from logits shifted to the estimated live prior; answers then carry
`"adapted": true | false` in addition to the Prediction fields.

Measured cost of the one handler, against the previous path (the guard parsed the body once and answered for the
service), both served side by side on a 2-core AMD EPYC shared with other jobs, tiny Gemm model, 28x28 PNG, access
log off, closed-loop clients, interleaved, median of 5 rounds of 5 s, two runs:
    concurrency 1:   p50 1.4 -> 2.2-2.5 ms; server CPU 1.5 -> 2.2-2.7 ms per request
    concurrency 16:  480-650 -> 250-270 req/s; server CPU 0.9-1.1 -> 2.0-2.1 ms per request
In process (`to_asgi()`, no sockets) it is ~0.8 ms CPU per request: ~0.2 ms for the temporary file BentoML writes
per upload (its request temp dir, on the root disk here), the rest its second multipart parse, input-model
validation, routing and response. Next to a model that takes milliseconds (ResNet-18 224 px on these cores: ~30 ms)
that is a few percent; with the tiny Gemm, throughput at concurrency 16 halves.

`/classify_raw` is a third `@bentoml.api` method on the same `_predict`: its one positional-only `bytes` parameter
makes BentoML hand it the request body as it is (no multipart parse, no temporary file; BentoML reads a body of an
image type with its JSON serde, which keeps a string-typed root input as raw bytes and fetches nothing). The guard
gives it the same key, size and time checks, and answers any Content-Type but the image types and
application/octet-stream with 415 (multipart or a form would be parsed by BentoML's other serdes). Measured against
/classify on the same server (tiny Gemm, 28x28 PNG, interleaved points, median of 3 sweeps of 5 s, 2 shared cores):
server CPU per request 2.42 -> 2.23 ms at concurrency 1 (p50 2.33 -> 2.06 ms) and 2.69 -> 1.83 ms at 16 (req/s
x1.11); next to a model of tens of ms (ResNet-18) the difference is within the noise.

`AsyncPredictor` (ltserve.serve.batcher) decodes in a thread pool and batches concurrent requests into one ONNX
Runtime call (an asyncio queue, one batch at a time): a lone request runs at once, and batches grow while the
previous one runs. It beat a batchable BentoML API behind a front service (`bentoml.depends`), which adds an
inter-process hop per request. Model logic lives in ltserve.runtime, request handling in ltserve.serve; this file
wires HTTP to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, SerializeAsAny
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import ltserve
from ltserve.errors import InvalidInput, LtserveError, PackageError
from ltserve.package import load_package
from ltserve.runtime import Prediction, Predictor
from ltserve.serve.batcher import AsyncPredictor
from ltserve.serve.guard import (ErrorBody, RequestGuard, TimeLimit, error_response, invalid_input_error,
                                 replace_bentoml_timeout)
from ltserve.serve.live_prior import AdaptingPredictor, LivePrediction, live_prior_from_settings, prior_metrics
from ltserve.serve.metrics import service_metrics
from ltserve.serve.openapi import complete_openapi
from ltserve.serve.settings import (BATCH_ROUTE, CLASSIFY_ROUTE, MODEL_ROUTE, PRIOR_RESET_ROUTE, PRIOR_ROUTE,
                                    RAW_ROUTE, ServiceSettings)
from ltserve.serve.worker import cpu_threads, prepare_server, setup_worker, worker_count

logger = logging.getLogger(__name__)


async def _model_info(request: Request) -> JSONResponse:
    """GET /model: the info of this worker's service instance, found through BentoML's own accessor."""
    try:
        svc = bentoml.get_current_service()
    except BentoMLException:  # the worker is still building the instance
        return error_response(503, "not_ready", "the model is still loading")
    return JSONResponse(svc.info)


_OPENAPI: dict = {}


async def _openapi(request: Request) -> JSONResponse:
    """GET /docs.json: BentoML's OpenAPI document of the service, completed (`ltserve.serve.openapi`); it takes the
    place of BentoML's own route, which comes after the mounted routes."""
    if not _OPENAPI:
        _OPENAPI.update(complete_openapi(Classifier.openapi_spec.asdict(), SETTINGS, ltserve.__version__))
    return JSONResponse(_OPENAPI)


async def _prior(request: Request) -> JSONResponse:
    """GET /prior, POST /prior/reset: the live prior of this server (merged over its workers), or a reset of it."""
    try:
        svc = bentoml.get_current_service()
    except BentoMLException:
        return error_response(503, "not_ready", "the model is still loading")
    if svc.prior is None:
        return error_response(404, "prior_off", "live label-shift estimation is off (LTSERVE_PRIOR_ADAPT=off); set "
                                                "LTSERVE_PRIOR_ADAPT=report or apply")
    if request.url.path == PRIOR_RESET_ROUTE:
        return JSONResponse(await asyncio.to_thread(svc.prior.reset))
    return JSONResponse(await asyncio.to_thread(svc.prior.report))


routes_app = Starlette(routes=[Route(MODEL_ROUTE, _model_info, methods=["GET"]),
                               Route(PRIOR_ROUTE, _prior, methods=["GET"]),
                               Route(PRIOR_RESET_ROUTE, _prior, methods=["POST"]),
                               Route("/docs.json", _openapi, methods=["GET"])])

# ---------------------------------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------------------------------

SETTINGS = ServiceSettings.from_env()
WORKERS = worker_count(SETTINGS)
# before BentoML builds the app (a worker's, or `to_asgi()`): its traffic timeout becomes a TimeLimit whose timer is
# cancelled when the answer is sent (BentoML's own holds each request's context until it fires: see TrafficTimeout)
replace_bentoml_timeout()
if bentoml.server_context.worker_index is not None:  # a `bentoml serve` worker, before its HTTP server starts
    setup_worker(SETTINGS)

# What a direct Python call of an API method gets as `ctx`: a context whose `response` exists only inside an HTTP
# request (BentoML keeps the request's response in a context variable), so `_error_answer` sets no status then.
NO_REQUEST = bentoml.Context()


# With live label shift on, answers are LivePredictions (a Prediction plus "adapted"): the 200 schemas say so.
ANSWER = Prediction if SETTINGS.prior_adapt == "off" else LivePrediction


class BatchResponse(BaseModel):
    """/classify_batch: one prediction per uploaded image, in upload order."""

    predictions: list[SerializeAsAny[ANSWER]]  # type: ignore[valid-type]  # SerializeAsAny: keep "adapted"


def _error_answer(ctx: bentoml.Context, status: int, body: ErrorBody) -> ErrorBody:
    """`body`, with the HTTP status of the answer set to `status` when called for an HTTP request."""
    with contextlib.suppress(LookupError):  # a direct Python call: there is no HTTP answer to set
        ctx.response.status_code = status
    return body


@bentoml.asgi_app(routes_app, path="/")
# BentoML's time limit is a backstop 1 s behind TimeLimit's; `replace_bentoml_timeout` made it a TrafficTimeout (a
# TimeLimit whose timer is cancelled with the answer: BentoML's own held each request's context until it fired).
@bentoml.service(name="ltserve", workers=WORKERS, traffic={"timeout": SETTINGS.timeout_s + 1})
class Classifier:
    """Classifies images with the model package named by LTSERVE_MODEL (default models/fashion-lt)."""

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.metrics = service_metrics()
        path = self.settings.model_path()
        try:
            predictor = Predictor(path, providers=self.settings.providers, threads=cpu_threads(self.settings, WORKERS),
                                  max_batch_size=self.settings.max_batch_size, backend=self.settings.backend,
                                  torch_options=self.settings.torch_options())
        except LtserveError as exc:
            logger.error("cannot start: model package %s: %s (set LTSERVE_MODEL to a package folder)", path, exc)
            raise
        self.prior = live_prior_from_settings(self.settings, predictor.meta, _worker_name(), prior_metrics())
        self.engine = AsyncPredictor(predictor if self.prior is None else AdaptingPredictor(predictor, self.prior),
                                     max_batch_size=self.settings.max_batch_size,
                                     max_latency_ms=self.settings.max_latency_ms,
                                     decode_threads=self.settings.decode_threads,
                                     on_batch=self.metrics["batch_size"].observe)
        self.info = {**predictor.info(), "service": {
            "top_k": self.settings.top_k, "max_upload_bytes": self.settings.max_upload_bytes,
            "max_pixels": self.settings.max_pixels, "max_request_pixels": self.settings.max_request_pixels,
            "max_batch_images": self.settings.max_batch_images,
            "max_batch_size": self.settings.max_batch_size, "max_latency_ms": self.settings.max_latency_ms,
            "decode_threads": self.engine.decode_threads, "workers": WORKERS, "pid": os.getpid(),
            "prior_adapt": self.settings.prior_adapt,
            **({"prior_state_dir": str(self.prior.state_dir)} if self.prior else {})}}
        logger.info("serving %s from %s", predictor.meta.name, path)

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
                                       "`ltserve export ... --format onnx,pt2`")
            else:
                meta = Predictor(path, providers=["cpu"], threads=1, max_batch_size=1).meta
            if SETTINGS.prior_method == "bbse" and SETTINGS.prior_adapt != "off" and meta.label_shift is None:
                raise PackageError(f"{path}: LTSERVE_PRIOR_METHOD=bbse needs the val confusion matrix in model.json "
                                   "(label_shift); re-export the package with this ltserve, or set "
                                   "LTSERVE_PRIOR_METHOD=em")
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

    @bentoml.api(route=CLASSIFY_ROUTE, output_spec=ANSWER)  # the 200 schema: see the module docstring
    async def classify(self, image: Path, ctx: bentoml.Context = NO_REQUEST) -> Prediction | ErrorBody:
        """Classify one image (multipart field `image`: JPEG, PNG, WebP, BMP, GIF, TIFF or PNM): its top-k classes.

        Args:
            image: the uploaded file (BentoML writes the upload to a request-scoped temporary file).
            ctx: BentoML's request context (sets the HTTP status of an error); direct Python calls leave it out.

        Returns:
            The Prediction; for a file that is not a usable image an ErrorBody, answered over HTTP with 400 (not a
            decodable image), 413 (more than LTSERVE_MAX_PIXELS or LTSERVE_MAX_REQUEST_PIXELS pixels) or 415 (a
            format not accepted).
        """
        result = await self._predict([image], ctx)
        return result if isinstance(result, ErrorBody) else result[0]

    @bentoml.api(route=RAW_ROUTE, output_spec=ANSWER)
    async def classify_raw(self, image: bytes, /, ctx: bentoml.Context = NO_REQUEST) -> Prediction | ErrorBody:
        """Classify one image sent as the request body (`Content-Type: image/jpeg`, another image type, or
        application/octet-stream): the cheapest request, with the answers and errors of `classify`.

        Args:
            image: the request body (positional-only: BentoML passes the whole body, no multipart, no file).
            ctx: as for `classify`.

        Returns:
            As `classify`, for the same image the same answer.
        """
        result = await self._predict([image], ctx)
        return result if isinstance(result, ErrorBody) else result[0]

    @bentoml.api(route=BATCH_ROUTE, output_spec=BatchResponse)
    async def classify_batch(self, images: list[Path],
                             ctx: bentoml.Context = NO_REQUEST) -> BatchResponse | ErrorBody:
        """Classify several images (repeated multipart field `images`), at most LTSERVE_MAX_BATCH_IMAGES.

        Returns:
            One prediction per image, in upload order; or an ErrorBody: 413 for more than LTSERVE_MAX_BATCH_IMAGES
            images or more than LTSERVE_MAX_REQUEST_PIXELS pixels in all (from the headers, before decoding), else
            as `classify` for the first unusable image (its detail starts with `images[i]:`).
        """
        cap = self.settings.max_batch_images
        if len(images) > cap:
            return _error_answer(ctx, 413, ErrorBody(error="too_many_images", detail=(
                f"{len(images)} images in one request; at most {cap} (LTSERVE_MAX_BATCH_IMAGES)")))
        result = await self._predict(images, ctx)
        return result if isinstance(result, ErrorBody) else BatchResponse(predictions=result)

    async def _predict(self, files: Sequence[bytes | Path], ctx: bentoml.Context) -> list[Prediction] | ErrorBody:
        """Decode, batch with concurrent requests, predict; one Prediction per file, or the ErrorBody of the first
        unusable file (its status set on the answer)."""
        try:
            predictions = await self.engine.classify(files, self.settings.top_k, self.settings.max_pixels,
                                                     self.settings.max_request_pixels)
        except InvalidInput as exc:
            return _error_answer(ctx, *invalid_input_error(exc))
        counter = self.metrics["predictions"]
        for p in predictions:
            counter.labels(shot_group=p.shot_group).inc()
        return predictions


def _worker_name() -> str:
    """This worker's index (1, 2, ...) as BentoML numbers its workers, stable across a worker's restarts; the pid
    when run outside a BentoML server."""
    from bentoml._internal.context import server_context

    index = getattr(server_context, "worker_index", None)
    return str(index) if index is not None else f"pid{os.getpid()}"


if SETTINGS.cors_origins:
    from starlette.middleware.cors import CORSMiddleware

    # added before the others, so it wraps them: preflights are answered here, and 4xx/504 carry CORS headers
    Classifier.add_asgi_middleware(CORSMiddleware, allow_origins=SETTINGS.cors_origins,
                                   allow_methods=["GET", "POST", "OPTIONS"],
                                   allow_headers=["Authorization", "Content-Type"])
Classifier.add_asgi_middleware(TimeLimit, timeout_s=SETTINGS.timeout_s)
Classifier.add_asgi_middleware(RequestGuard, settings=SETTINGS)
