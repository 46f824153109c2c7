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
(ltserve.serve.batcher) decodes in a thread pool and batches concurrent requests into one ONNX Runtime call (an asyncio
queue, one batch at a time): a lone request runs at once, and batches grow while the previous one runs. It beat a
batchable BentoML API behind a front service (`bentoml.depends`), which adds an inter-process hop per request.
Model logic lives in ltserve.runtime, request handling in ltserve.serve; this file wires HTTP to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ltserve.errors import InvalidInput, LtserveError, PackageError
from ltserve.package import load_package
from ltserve.runtime import Prediction, Predictor
from ltserve.serve.batcher import AsyncPredictor
from ltserve.serve.guard import RequestGuard, current, error_response, invalid_input_response
from ltserve.serve.metrics import service_metrics
from ltserve.serve.settings import BATCH_ROUTE, CLASSIFY_ROUTE, MODEL_ROUTE, ServiceSettings

logger = logging.getLogger(__name__)


async def _model_info(request: Request) -> JSONResponse:
    svc = current.get("service")
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
                                  max_batch_size=self.settings.max_batch_size, backend=self.settings.backend,
                                  torch_options=self.settings.torch_options())
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
        current["service"] = self
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
        current.pop("service", None)

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
