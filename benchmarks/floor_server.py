"""The floor: the least a Python HTTP server does for ltserve's answer, for `benchmarks.serve_overhead` to compare
against. One process: uvicorn with its pure-Python h11 protocol (what BentoML runs unless told otherwise) and
Starlette; each request's multipart form parsed once (Starlette's parser), then PIL decode, NumPy normalise and ONNX
Runtime through the same `Predictor` calls the product makes, and the answer as JSON. No limits, no batching, no
metrics, no access log.

    python -m benchmarks.floor_server MODEL_DIR PORT
"""

from __future__ import annotations

import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ltserve.runtime import Predictor


def app_for(model_dir: str) -> Starlette:
    """The floor app on one package: /classify (multipart field `image`) and /classify_raw (the body)."""
    predictor = Predictor(model_dir, max_batch_size=1)

    def answer(data: bytes) -> Response:
        logits = predictor.predict(predictor.preprocess([predictor.decode(data)]))
        return Response(predictor.postprocess(logits, 5)[0].model_dump_json(), media_type="application/json")

    async def classify(request: Request) -> Response:
        form = await request.form()
        return answer(await form["image"].read())

    async def classify_raw(request: Request) -> Response:
        return answer(await request.body())

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]),
                             Route("/classify_raw", classify_raw, methods=["POST"]),
                             Route("/readyz", lambda request: Response("\n"), methods=["GET"])])


def main() -> None:
    import uvicorn

    model_dir, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(app_for(model_dir), host="127.0.0.1", port=port, http="h11", loop="asyncio", access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
