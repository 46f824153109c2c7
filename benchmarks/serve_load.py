"""HTTP serving load test: `bentoml serve` against the in-process Predictor on the same images.

    python -m benchmarks.serve_load                   # tiny (Fashion-MNIST Gemm) and ResNet-18 224 px (random weights)
    python -m benchmarks.serve_load --models tiny --concurrency 1,4,16 --duration 5
    python -m benchmarks.serve_load --models resnet18 --precisions fp32,int8 --concurrency 1,16 --repeat 3
    python -m benchmarks.serve_load --smoke           # seconds: checks the script (make test)

For each model it measures
  - in process: p50/p99 of one image (decode + preprocess + predict + postprocess); images/s of decode (one
    thread) and of inference at batch `max_batch_size`; and the ceiling of the whole pipeline with every core busy:
    a decode thread pool overlapped with preprocess + inference at the batch size with the most images/s in the
    warm-up timings, back to back (the same work as the server, without HTTP);
  - over HTTP, closed loop, keep-alive, on one server: `POST /classify` (one image, multipart) and
    `POST /classify_raw` (one image as the body) at each concurrency, points alternating, and `POST /classify_batch`
    with 64 images per request (`--batch-concurrency`): req/s, img/s, p50/p99, the server's CPU per request, the
    mean batch size it ran (from /metrics), errors (a non-200 or wrong class, a failed connection), img/s as a share
    of the in-process ceiling; /classify also without adaptive batching (LTSERVE_MAX_BATCH_SIZE=1);
  - HTTP overhead = p50 (p99) over HTTP at concurrency 1 minus the in-process p50 (p99) measured right before it.
Images: Fashion-MNIST PNGs for the tiny model (its data; the cost is all serving overhead), JPEG photos of typical
size for the others (shorter side 256-640 px: 48 seeded crops of the photos scikit-learn and scikit-image ship, or
the JPEGs of that size under `--corpus`). Concurrency goes up to 256; the default sweep is 1,4,16,64,256 with a GPU
and 1,4,16 on CPU, where 16 clients already keep every core busy (on 2 cores more only add queueing).
The ResNet-18 package is the product's export (`ltserve export` of a run with a seeded random timm ResNet-18, 1000
classes); `--precisions fp32,int8` also exports it as int8 (`--precision int8`, calibrated on the training images
of the data set its config names) and serves both, their sweeps interleaved, as "resnet18" and "resnet18-int8".
`--backend torch` (default: $LTSERVE_BACKEND, else onnxruntime) runs the in-process Predictor and the servers on the
package's model.pt2 through PyTorch (CUDA on a GPU machine), so that both sides of every comparison run the same
backend; each server's own report of what it runs (GET /model, "runtime") is kept in results.json.
With `--paths depends` it also serves the alternative request path (a batchable BentoML API behind a front API,
`bentoml.depends`, defined at the end of this file) at the same points.

The client is a minimal asyncio HTTP/1.1 client (pre-built request bytes) so that on small machines the load
generator takes as little CPU from the server as possible. Output: results.json, results.md and results.png in
benchmarks/results/<machine>/serve_load/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.serve.process import ServerProcess

from benchmarks.common import add_common_args, markdown_table, output_dir, percentiles, write_results
from benchmarks.loadgen import Connection, multipart, tree_cpu_s

REPO = Path(__file__).resolve().parents[1]
NAME = "serve_load"
ROUTES = {"multipart": "/classify", "raw": "/classify_raw", "batch": "/classify_batch"}
"""The request kinds a server is swept with: one image as multipart, one image as the raw body, BATCH_IMAGES
images per multipart request."""
BATCH_IMAGES = 64
GPU_CONCURRENCY = "1,4,16,64,256"
CPU_CONCURRENCY = "1,4,16"


# ---------------------------------------------------------------------------------------------------------------------
# Model packages (written here so the benchmark needs no training run)
# ---------------------------------------------------------------------------------------------------------------------


def write_package(out: Path, model_proto: Any, spec: Any, labels: list[str], counts: list[int], name: str) -> Path:
    """Save an ONNX ModelProto and describe it through ltserve's one model.json writer."""
    import onnx

    from ltserve.package import HeadInfo, graph_info
    from ltserve.package import write_package as write_model_json

    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model_proto, str(out / "model.onnx"))
    write_model_json(out, name=name, labels=labels, class_counts=counts, preprocess=spec,
                     head=HeadInfo(name="benchmark"), graph=graph_info(model_proto), files=["model.onnx"],
                     command="benchmarks/serve_load.py")
    return out


def make_tiny(out: Path, seed: int) -> Path:
    """Fashion-MNIST-sized Gemm (1x28x28 -> 10), seeded random weights: the cost is all serving overhead."""
    from onnx import TensorProto, helper, numpy_helper

    from ltserve.preprocess import PreprocessSpec

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (10, 784)).astype(np.float32)
    b = np.zeros(10, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], transB=1)], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = PreprocessSpec(resize=28, crop=28, mean=(0.286,), std=(0.353,), channels=1)
    labels = [f"class_{i}" for i in range(10)]
    return write_package(out, model, spec, labels, [1000, 600, 360, 215, 130, 77, 46, 28, 17, 10], "tiny-gemm")


def make_resnet18(out: Path, seed: int, precision: str = "fp32") -> Path:
    """ResNet-18 at 224 px, 1000 classes, seeded random weights: a synthetic run (as stage 1 and 2 write it, see
    `benchmarks.model_latency.synthetic_run`) exported by `ltserve.export.export_package` in `precision`; the run
    is shared between precisions (needs torch and the Fashion-MNIST files, which export verifies on)."""
    from benchmarks.model_latency import INT8_CALIBRATION_IMAGES, synthetic_run
    from ltserve.export import Int8Options, export_package

    run = out.parent / "resnet18-run"
    if not (run / "run.json").is_file():
        synthetic_run(run, "resnet18", 224, 1000, seed=seed, heads=("joint",))
    export_package(run, "joint", out, precision=precision, verify_images=32,
                   int8=Int8Options(calibration_images=INT8_CALIBRATION_IMAGES), command="benchmarks/serve_load.py",
                   progress=False)
    return out


def tiny_images(n: int, seed: int) -> list[bytes]:
    """Fashion-MNIST test images as PNG bytes (synthetic 28x28 noise when the data set is absent)."""
    from PIL import Image

    try:
        from ltserve.data import find_fashion_mnist, read_idx

        arrays = read_idx(find_fashion_mnist() / "t10k-images-idx3-ubyte.gz")[:n]
    except Exception:  # the benchmark still runs without the data set
        arrays = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


TYPICAL_SHORTER_SIDE = (256, 640)


def typical_photos(work: Path, seed: int, corpus: Path | None = None, n: int = 48) -> list[bytes]:
    """Real JPEG photos of a typical upload's size (shorter side 256-640 px): the JPEGs of that size under `corpus`,
    or `n` seeded crops of the photos scikit-learn and scikit-image ship, re-encoded at quality 75-95
    (`benchmarks.batch_predict.make_corpus`)."""
    if corpus is None:
        from benchmarks.batch_predict import make_corpus

        return [p.read_bytes() for p in make_corpus(work / "photos", n, seed)]
    from PIL import Image

    out = []
    for path in sorted(corpus.rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg"):
            with Image.open(path) as im:
                if TYPICAL_SHORTER_SIDE[0] <= min(im.size) <= TYPICAL_SHORTER_SIDE[1]:
                    out.append(path.read_bytes())
    if not out:
        raise SystemExit(f"--corpus {corpus}: no JPEG with its shorter side {TYPICAL_SHORTER_SIDE[0]}-"
                         f"{TYPICAL_SHORTER_SIDE[1]} px under it")
    return out


def corpus_stats(images: list[bytes]) -> dict[str, Any]:
    """What the images sent are: count, formats, shorter sides and sizes in bytes."""
    from PIL import Image

    sides, formats = [], set()
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            sides.append(min(im.size))
            formats.add(im.format)
    sizes = [len(d) for d in images]
    return {"images": len(images), "formats": sorted(formats), "shorter_side_px": [min(sides), max(sides)],
            "bytes_mean": float(np.mean(sizes)), "bytes_max": max(sizes)}


# ---------------------------------------------------------------------------------------------------------------------
# In-process baseline
# ---------------------------------------------------------------------------------------------------------------------


def measure_in_process(package: Path, images: list[bytes], threads: int, max_batch_size: int,
                       seconds: float, backend: str = "onnxruntime") -> dict[str, Any]:
    """The same work without HTTP: p50/p99 of one image end to end, decode and inference rates, and the ceiling.

    The ceiling is the in-process batched pipeline a server could at best match: a decode thread pool decoding the
    next batch while the Predictor runs the current one, back to back, every core busy: at the batch size (up to
    `max_batch_size`) with the most images/s in the Predictor's warm-up timings, with the better of a pool of the
    server's size (min(4, cores)) and one of every core.
    """
    from ltserve.runtime import Predictor

    pred = Predictor(package, threads=threads, max_batch_size=max_batch_size, backend=backend)
    single = single_image_latency(pred, images, seconds / 2)
    decode_ips = _rate(lambda k: pred.decode(images[k % len(images)]) is not None, seconds / 4)
    cores = os.cpu_count() or 1
    batch = pred.preprocess([pred.decode(images[k % len(images)]) for k in range(max_batch_size)])
    infer_ips = max_batch_size * _rate(lambda k: pred.postprocess(pred.predict(batch), 5) is not None, seconds / 4)
    # the whole pipeline with every core busy: inference at the batch size with the most images/s in the warm-up
    # timings (what the server's batcher runs under load: on a few CPU cores a large convolution batch can be
    # slower per image than a small one), overlapped with a decode pool of the server's size (min(4, cores)) and
    # of every core; the faster is the ceiling
    ceiling_batch = max((b for b in pred.buckets if b <= max_batch_size), key=lambda b: b / pred.bucket_ms[b])
    ceilings = {t: _pipelined_rate(pred, images, ceiling_batch, seconds, t) for t in sorted({min(4, cores), cores})}
    best = max(ceilings, key=ceilings.get)
    return {"single": single, "decode_img_s": decode_ips, "infer_img_s": infer_ips,
            "ceiling_img_s": ceilings[best], "ceiling_decode_threads": best, "ceiling_batch": ceiling_batch,
            "ceiling_by_decode_threads": ceilings,
            # what a GPU server can at best be fed: every core decoding (Pillow releases the GIL while it decodes)
            "cpu_decode_img_s": _decode_pool_rate(pred, images, cores, seconds / 4), "cores": cores,
            "bucket_ms": pred.bucket_ms, "max_batch_size": max_batch_size, "threads": threads, "backend": backend}


def single_image_latency(pred: Any, images: list[bytes], seconds: float) -> dict[str, float]:
    """p50/p90/p99/mean (ms) of one image end to end: decode, preprocess, predict, postprocess."""
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 20:
        t0 = time.perf_counter()
        pred.classify_bytes([images[len(lat) % len(images)]], top_k=5)
        lat.append((time.perf_counter() - t0) * 1000)
    return percentiles(lat)


def _rate(step, seconds: float, minimum: int = 3) -> float:
    """Calls per second of step(k), k = 0, 1, ..., over about `seconds`."""
    t0 = time.perf_counter()
    k = 0
    while time.perf_counter() - t0 < seconds or k < minimum:
        step(k)
        k += 1
    return k / (time.perf_counter() - t0)


def _decode_pool_rate(pred: Any, images: list[bytes], threads: int, seconds: float) -> float:
    """Images/s decoded (to model-sized arrays) by `threads` threads, over about `seconds`."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = 4 * threads
    with ThreadPoolExecutor(threads) as pool:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < chunk:
            list(pool.map(pred.decode, [images[(n + i) % len(images)] for i in range(chunk)]))
            n += chunk
        return n / (time.perf_counter() - t0)


def _pipelined_rate(pred: Any, images: list[bytes], batch_size: int, seconds: float, threads: int) -> float:
    """Images/s of decode (a pool of `threads`) overlapped with batched preprocess + predict + postprocess, in one
    process."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        def submit(first: int) -> list:
            return [pool.submit(pred.decode, images[(first + i) % len(images)]) for i in range(batch_size)]

        pending, n = submit(0), 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 3 * batch_size:
            arrays = [f.result() for f in pending]
            pending = submit(n + batch_size)
            pred.postprocess(pred.predict(pred.preprocess(arrays)), 5)
            n += batch_size
        elapsed = time.perf_counter() - t0
        for f in pending:
            f.result()
    return n / elapsed


# ---------------------------------------------------------------------------------------------------------------------
# Server and client
# ---------------------------------------------------------------------------------------------------------------------


class Server(ServerProcess):
    """`bentoml serve TARGET` from the repository root, with the Prometheus metrics the sweep reads."""

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text

    def runtime(self) -> dict[str, Any]:
        import httpx

        reply = httpx.get(f"http://127.0.0.1:{self.port}/model", timeout=10)
        return reply.json().get("runtime", {}) if reply.status_code == 200 else {}


def multipart_request(port: int, image: bytes, field: str = "image", route: str = "/classify") -> bytes:
    """The bytes of one keep-alive HTTP/1.1 multipart POST (built once, sent many times)."""
    return multipart(port, [(field, "img", image)], route)


def raw_request(port: int, image: bytes) -> bytes:
    """The bytes of one keep-alive POST /classify_raw: the image as the body, under its own media type."""
    from ltserve.preprocess import IMAGE_FORMATS, sniff_format

    fmt = sniff_format(image)
    media = next((f.media_types[0] for f in IMAGE_FORMATS if f.pillow == fmt), "application/octet-stream")
    return (f"POST /classify_raw HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {media}\r\n"
            f"Content-Length: {len(image)}\r\nConnection: keep-alive\r\n\r\n").encode() + image


def route_requests(port: int, route: str, images: list[bytes], expected: list[int],
                   per_request: int = BATCH_IMAGES) -> tuple[list[bytes], list[list[int]]]:
    """The requests a sweep of `route` cycles through, and the class indices each must be answered with: one image
    per request (ROUTES), or `per_request` images per /classify_batch request, every image used."""
    if route == "batch":
        groups = [[(first + k) % len(images) for k in range(per_request)]
                  for first in range(0, len(images), per_request)]
        return ([multipart(port, [("images", f"{k}", images[k]) for k in g], "/classify_batch") for g in groups],
                [[expected[k] for k in g] for g in groups])
    build = raw_request if route == "raw" else multipart_request
    return [build(port, im) for im in images], [[e] for e in expected]


async def closed_loop(port: int, requests: list[bytes], expected: list[list[int]], concurrency: int,
                      seconds: float) -> dict[str, Any]:
    """`concurrency` clients, each sending the next request as soon as its previous answer arrived; an answer that is
    not a 200 with the expected classes, and a failed connection (then reopened), count as errors."""
    latencies: list[float] = []
    errors: list[str] = []
    images = 0
    stop_at = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal images
        conn = Connection(port)
        i = k
        try:
            while time.perf_counter() < stop_at:
                j = i % len(requests)
                i += concurrency
                t0 = time.perf_counter()
                try:
                    status, _, body = await conn.request(requests[j])
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                    errors.append(f"connection: {exc!r}")
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    errors.append(f"{status} {body[:200]!r}")
                    continue
                got = answered_classes(json.loads(body))
                if got != expected[j]:
                    errors.append(f"request {j}: classes {got} != {expected[j]}")
                else:
                    images += len(got)
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(latencies), "req_s": len(latencies) / wall,
            "img_s": images / wall, "errors": len(errors), "first_errors": errors[:3], **percentiles(latencies)}


def answered_classes(answer: dict[str, Any]) -> list[int]:
    """The top-1 class indices of an answer: a Prediction, a batch's predictions, or an Open Inference Protocol
    answer with the classification extension ("score:index:label" strings, top 1 per image)."""
    if "predictions" in answer:
        return [p["class_index"] for p in answer["predictions"]]
    if "outputs" in answer:
        return [int(s.split(":", 2)[1]) for s in answer["outputs"][0]["data"]]
    return [answer["class_index"]]


def v2_request(port: int, model: str, image: bytes) -> bytes:
    """The bytes of one keep-alive Open Inference Protocol infer request: the image base64 in JSON, top 1 asked."""
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(image).decode()]}],
                       "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}).encode()
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body


def batch_stats(metrics_text: str) -> tuple[float, float]:
    """(batches run, images run) from ltserve_batch_size (or BentoML's adaptive_batch_size) in /metrics."""
    count = total = 0.0
    for line in metrics_text.splitlines():
        for prefix in ("ltserve_batch_size", "bentoml_service_adaptive_batch_size"):
            if line.startswith(prefix + "_count"):
                count += float(line.rsplit(" ", 1)[1])
            elif line.startswith(prefix + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
    return count, total


def measure_server(target: str, env: dict[str, str], images: list[bytes], expected: list[int],
                   sweeps: dict[str, list[int]], seconds: float, log: Path,
                   baseline: Any = None) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Closed-loop sweeps against one fresh server: for each request kind of `sweeps` (ROUTES: "multipart", "raw",
    "batch"), one point per concurrency; the kinds alternate point by point, so that they share the machine's state
    of each minute. `baseline()` (in-process latency) runs right before the first point, so that the HTTP overhead
    compares measurements taken minutes apart at most.

    Returns the rows (one per concurrency) of each kind, and the server's own account of its runtime (GET /model
    "runtime": backend, providers, torch device and precision), or {} when the target has no such route."""
    server = Server(env, log, target=target, cwd=REPO)
    rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in sweeps}
    try:
        server.wait_ready()
        runtime = server.runtime()
        requests = {kind: route_requests(server.port, kind, images, expected) for kind in sweeps}
        for kind in sweeps:  # warm connections and caches
            asyncio.run(closed_loop(server.port, *requests[kind], 2, min(2.0, seconds)))
        in_process = baseline() if baseline is not None else None
        points = [(i, kind, c) for kind, cs in sweeps.items() for i, c in enumerate(cs)]
        for _, kind, c in sorted(points, key=lambda p: p[0]):
            load = os.getloadavg()[0]  # this run's server and client included: shows other work on the machine
            before, cpu0 = batch_stats(server.metrics()), tree_cpu_s(server.proc.pid)
            row = asyncio.run(closed_loop(server.port, *requests[kind], c, seconds))
            after, cpu1 = batch_stats(server.metrics()), tree_cpu_s(server.proc.pid)
            batches, imgs = after[0] - before[0], after[1] - before[1]
            row["mean_batch"] = imgs / batches if batches else None
            # the server's CPU per request: two /metrics reads included (~ms), small next to thousands of requests
            row["server_cpu_ms_per_req"] = 1000 * (cpu1 - cpu0) / max(row["requests"], 1)
            row["load_1min"] = load
            if in_process is not None and not any(rows.values()):
                row["in_process_single"] = in_process
            rows[kind].append(row)
            print(f"    {kind:<9} c={c:<3} {row['req_s']:8.1f} req/s {row['img_s']:8.1f} img/s  p50 "
                  f"{row['p50']:7.2f} ms  p99 {row['p99']:7.2f} ms  server CPU {row['server_cpu_ms_per_req']:6.2f} "
                  f"ms/req  mean batch {row['mean_batch'] or float('nan'):.2f}  errors {row['errors']}", flush=True)
    finally:
        server.stop()
    return rows, runtime


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, NAME)
    parser.add_argument("--models", default="tiny,resnet18", help="tiny, resnet18, or paths of model packages")
    parser.add_argument("--concurrency", default=None,
                        help="clients of the /classify and /classify_raw sweeps, up to 256 (default: 1,4,16,64,256 "
                        f"with a GPU; {CPU_CONCURRENCY} on CPU, where 16 clients already keep every core busy and "
                        "more only add queueing)")
    parser.add_argument("--batch-concurrency", default="1,2,4",
                        help=f"clients of the /classify_batch sweep, {BATCH_IMAGES} images per request")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a folder of JPEG photos (those with a shorter side of 256-640 px are used) for the "
                        "photo models; default: 48 seeded crops of the photos scikit-learn and scikit-image ship")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured point")
    parser.add_argument("--repeat", type=int, default=1, help="sweeps per server configuration, interleaved; the "
                        "median of each point is reported (shared machines are noisy)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime threads (server and "
                        "in-process)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batched-only", action="store_true",
                        help="serve only with batching (LTSERVE_MAX_BATCH_SIZE=--max-batch-size), not also unbatched")
    parser.add_argument("--precisions", default="fp32",
                        help="fp32, or fp32,int8: also serve resnet18 exported as int8, sweeps interleaved")
    parser.add_argument("--backend", choices=["onnxruntime", "torch"],
                        default=os.environ.get("LTSERVE_BACKEND", "onnxruntime"),
                        help="what runs the model, in process and in the servers (default: $LTSERVE_BACKEND, else "
                        "onnxruntime); torch = model.pt2 through PyTorch, CUDA when there is a GPU")
    parser.add_argument("--max-latency-ms", type=float, default=5.0)
    parser.add_argument("--paths", default="inprocess", help="request paths to serve: inprocess, depends")
    parser.add_argument("--access-log", action="store_true", help="keep BentoML's access log on (off by default)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.concurrency, args.duration, args.repeat, args.paths = "tiny", "1,4", 1.0, 1, "inprocess"
        args.batch_concurrency = "1"
    if args.concurrency is None:
        args.concurrency = GPU_CONCURRENCY if _has_gpu(args.backend) else CPU_CONCURRENCY
    if max(int(c) for c in args.concurrency.split(",")) > 256:
        raise SystemExit(f"--concurrency {args.concurrency}: at most 256 clients")
    return args


def _has_gpu(backend: str) -> bool:
    """Whether the model will run on a GPU: CUDA in ONNX Runtime's providers, or in torch for the torch backend."""
    try:
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def server_configs(args: argparse.Namespace) -> list[tuple[str, str, dict[str, str]]]:
    """(key, bentoml target, extra env) of every server measured: in-process batcher with and without batching,
    and optionally the bentoml.depends path."""
    batched = {"LTSERVE_MAX_BATCH_SIZE": str(args.max_batch_size)}
    configs = [("inprocess/batched", "ltserve.service:Classifier", batched)]
    if not args.smoke and not args.batched_only:
        configs.append(("inprocess/unbatched", "ltserve.service:Classifier", {"LTSERVE_MAX_BATCH_SIZE": "1"}))
    if "depends" in args.paths.split(","):
        configs.append(("depends/batched", "benchmarks.serve_load:DependsFront", batched))
    return configs


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Point-wise median over repeated sweeps (errors summed); each point keeps its raw runs."""
    out = []
    for points in zip(*runs):
        row = {"concurrency": points[0]["concurrency"], "errors": sum(p["errors"] for p in points),
               "requests": sum(p["requests"] for p in points), "runs": list(points)}
        for k in ("req_s", "img_s", "p50", "p90", "p99", "mean", "server_cpu_ms_per_req"):
            row[k] = float(np.median([p[k] for p in points]))
        batches = [p["mean_batch"] for p in points if p["mean_batch"] is not None]
        row["mean_batch"] = float(np.median(batches)) if batches else None
        out.append(row)
    return out


def benchmark_model(model: str, args: argparse.Namespace, work: Path, out: Path) -> dict[str, dict[str, Any]]:
    """In-process numbers, then every server configuration of every precision's package, `repeat` times
    interleaved (the order reverses every sweep). Returns {name: result}, name = model, or model-int8; its "http"
    holds one row list per configuration and request kind (`result_key`)."""
    packages, images = _model(model, work, args.seed, precisions_of(args), args.corpus)
    configs = server_configs(args)
    base_env = {"LTSERVE_THREADS": str(args.threads), "LTSERVE_MAX_LATENCY_MS": str(args.max_latency_ms),
                "LTSERVE_TOP_K": "5", "LTSERVE_MAX_BATCH_IMAGES": str(BATCH_IMAGES), "LTSERVE_BACKEND": args.backend}
    if not args.access_log:
        base_env["BENTOML_CONFIG_OPTIONS"] = "api_server.logging.access.enabled=false"
    res: dict[str, dict[str, Any]] = {}
    expected: dict[str, list[int]] = {}
    baselines: dict[str, Any] = {}
    for name, package in packages.items():
        print(f"== {name}: {package}", flush=True)
        res[name], expected[name], baselines[name] = _in_process(package, images, args)
        res[name]["corpus"] = corpus_stats(images)
    runs: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
    runtimes: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in packages}
    order = [(n, cfg) for cfg in configs for n in packages]  # fp32 and int8 of one config run back to back
    for r in range(args.repeat):
        for name, (key, target, env) in (order if r % 2 == 0 else order[::-1]):
            print(f"  {name} {key} (sweep {r + 1}/{args.repeat}):", flush=True)
            log = work / f"server_{Path(name).name}_{key.replace('/', '_')}.log"
            rows, runtime = measure_server(
                target, {**base_env, "LTSERVE_MODEL": str(packages[name]), **env}, images, expected[name],
                sweeps_of(key, args), args.duration, log, baselines[name] if key == "inprocess/batched" else None)
            for kind, kind_rows in rows.items():
                runs.setdefault((name, result_key(key, kind)), []).append(kind_rows)
                runtimes[name][result_key(key, kind)] = runtime
    for name in packages:
        res[name].update({"server_runtime": runtimes[name],
                          "http": {key: median_rows(r) for (n, key), r in runs.items() if n == name}})
        low = sweeps_of("inprocess/batched", args)["multipart"][0]
        res[name]["http_overhead_ms"] = http_overhead(res[name]["http"]["inprocess/batched"], low)
        print(f"  {name}: HTTP overhead at concurrency {low}: p50 {res[name]['http_overhead_ms']['p50']:.2f} ms, p99 "
              f"{res[name]['http_overhead_ms']['p99']:.2f} ms", flush=True)
        res[name]["raw_vs_multipart"] = raw_vs_multipart(res[name]["http"])
    return res


def sweeps_of(key: str, args: argparse.Namespace) -> dict[str, list[int]]:
    """The request kinds (ROUTES) and concurrencies a server configuration is swept with: the in-process batcher
    with batching gets all three; the others, /classify only."""
    sweeps = {"multipart": [int(c) for c in args.concurrency.split(",")]}
    if key == "inprocess/batched":
        sweeps["raw"] = sweeps["multipart"]
        sweeps["batch"] = [int(c) for c in args.batch_concurrency.split(",")]
    return sweeps


def result_key(config: str, kind: str) -> str:
    """The name of a sweep in results: the configuration for /classify ("inprocess/batched"), else configuration
    and request kind ("inprocess/batched raw", "inprocess/batched batch64")."""
    return config if kind == "multipart" else f"{config} {kind}" + (str(BATCH_IMAGES) if kind == "batch" else "")


def raw_vs_multipart(http: dict[str, list[dict[str, Any]]], config: str = "inprocess/batched") -> list[dict[str, Any]]:
    """Per concurrency: the raw route against /classify on the same server (medians over sweeps): req/s, p50, and
    the server's CPU per request."""
    raw = {r["concurrency"]: r for r in http.get(result_key(config, "raw"), [])}
    out = []
    for m in http.get(config, []):
        r = raw.get(m["concurrency"])
        if r is None:
            continue
        out.append({"concurrency": m["concurrency"], "req_s_ratio": r["req_s"] / max(m["req_s"], 1e-9),
                    "p50_ms_saved": m["p50"] - r["p50"],
                    "server_cpu_ms_per_req": {"multipart": m["server_cpu_ms_per_req"],
                                              "raw": r["server_cpu_ms_per_req"]}})
    return out


def _in_process(package: Path, images: list[bytes], args: argparse.Namespace) -> tuple[dict[str, Any], list[int], Any]:
    """({"package", "precision", "in_process"}, the answers the servers must give, the in-process baseline)."""
    from ltserve.runtime import Predictor

    # the answers the servers must give: same backend (fp16 on a GPU may break near-ties differently from fp32)
    reference = Predictor(package, threads=1, backend=args.backend)
    expected = [p.class_index for p in reference.classify_bytes(images, top_k=1)]
    inproc = measure_in_process(package, images, args.threads, args.max_batch_size, min(args.duration, 4.0),
                                args.backend)
    print(f"  in process: p50 {inproc['single']['p50']:.2f} ms, p99 {inproc['single']['p99']:.2f} ms, ceiling "
          f"{inproc['ceiling_img_s']:.1f} img/s (decode {inproc['decode_img_s']:.0f}, "
          f"infer {inproc['infer_img_s']:.0f})", flush=True)
    single = Predictor(package, threads=args.threads, max_batch_size=args.max_batch_size, backend=args.backend)

    def baseline() -> dict[str, float]:
        return single_image_latency(single, images, min(args.duration, 4.0))

    return ({"package": str(package), "precision": reference.meta.graph.precision, "in_process": inproc}, expected,
            baseline)


def http_overhead(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """HTTP at `concurrency` minus the in-process latency measured right before it (median over sweeps)."""
    c1 = next(r for r in rows if r["concurrency"] == concurrency)
    pairs = [(run["p50"] - run["in_process_single"]["p50"], run["p99"] - run["in_process_single"]["p99"])
             for run in c1["runs"]]
    return {"p50": float(np.median([a for a, _ in pairs])), "p99": float(np.median([b for _, b in pairs])),
            "concurrency": c1["concurrency"],
            "in_process_p50": float(np.median([r["in_process_single"]["p50"] for r in c1["runs"]])),
            "http_p50": c1["p50"]}


def int8_goals(results: dict[str, Any], concurrency: int = 16, target: float = 1.7) -> list[dict[str, Any]]:
    """Served /classify req/s of each model's int8 package over its fp32 package at `concurrency` (batched path).

    The ratio is the median over sweeps of int8 / fp32 within the same sweep (the two servers run back to back, so
    each pair shares the machine's state of that minute); every sweep's ratio is listed.
    """
    out = []
    for name, res in results.items():
        fp32 = results.get(name.removesuffix("-int8")) if name.endswith("-int8") else None
        if fp32 is None:
            continue
        pick = [next((r for r in x["http"]["inprocess/batched"] if r["concurrency"] == concurrency), None)
                for x in (fp32, res)]
        if None in pick:
            continue
        pairs = [b["req_s"] / a["req_s"] for a, b in zip(pick[0].get("runs") or [pick[0]], pick[1].get("runs")
                                                         or [pick[1]])]
        ratio = float(np.median(pairs))
        out.append({"goal": f"service /classify {name.removesuffix('-int8')} at concurrency {concurrency}, int8 vs "
                            "fp32 req/s", "target": f">= {target}x",
                    "measured": f"{ratio:.2f}x (median of {len(pairs)} sweeps: "
                                + ", ".join(f"{q:.2f}" for q in pairs) + f"; medians {pick[1]['req_s']:.1f} vs "
                                f"{pick[0]['req_s']:.1f} req/s, p50 {pick[1]['p50']:.0f} vs {pick[0]['p50']:.0f} ms)",
                    "met": ratio >= target, "paired_ratios": pairs})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = NAME + ("_int8" if "int8" in precisions_of(args) else "")  # its own folder, beside the fp32 runs
    out = output_dir(args, name)
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))  # generated packages and server logs
    try:
        results: dict[str, dict[str, Any]] = {}
        for m in args.models.split(","):
            results.update(benchmark_model(m, args, work, out))
    except BaseException:
        print(f"server logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    rows_md = [{"model": m, "path": key, "runs_on": runs_on(res["server_runtime"].get(key, {})), **r,
                "of_ceiling_%": 100.0 * r["img_s"] / res["in_process"]["ceiling_img_s"]}
               for m, res in results.items() for key, rows in res["http"].items() for r in rows]
    table = markdown_table(rows_md, ["model", "path", "runs_on", "concurrency", "req_s", "img_s", "p50", "p99",
                                     "server_cpu_ms_per_req", "mean_batch", "of_ceiling_%", "errors"])
    inproc_rows = [{"model": m, "backend": r["in_process"]["backend"],
                    "p50_ms": r["in_process"]["single"]["p50"], "p99_ms": r["in_process"]["single"]["p99"],
                    "decode_img_s": r["in_process"]["decode_img_s"], "infer_img_s": r["in_process"]["infer_img_s"],
                    "ceiling_img_s": r["in_process"]["ceiling_img_s"],
                    "ceiling_batch": r["in_process"]["ceiling_batch"],
                    "ceiling_decode_threads": r["in_process"]["ceiling_decode_threads"],
                    "cpu_decode_img_s": r["in_process"]["cpu_decode_img_s"],
                    "http_overhead_p50_ms": r["http_overhead_ms"]["p50"],
                    "http_overhead_p99_ms": r["http_overhead_ms"]["p99"]} for m, r in results.items()]
    corpus_rows = [{"model": m, **r["corpus"]} for m, r in results.items()]
    raw_rows = [{"model": m, "concurrency": x["concurrency"], "raw/multipart req_s": x["req_s_ratio"],
                 "p50_ms_saved": x["p50_ms_saved"], "server_cpu_ms_multipart": x["server_cpu_ms_per_req"]["multipart"],
                 "server_cpu_ms_raw": x["server_cpu_ms_per_req"]["raw"]}
                for m, r in results.items() for x in r["raw_vs_multipart"]]
    notes = ("HTTP, closed loop, keep-alive, one server per configuration: POST /classify (one image, multipart), "
             f"POST /classify_raw (\"raw\": one image as the body) and POST /classify_batch (\"batch{BATCH_IMAGES}\": "
             f"{BATCH_IMAGES} images per multipart request), their points alternating on the same server; req_s, "
             f"img_s, p50, p99 (ms) are medians over {args.repeat} interleaved sweep(s) of {args.duration:g} s per "
             "point; errors = answers other than a 200 with the expected classes, and failed connections; "
             "server_cpu = CPU time of the server's process tree per request. In process: one image end to end (decode, preprocess, "
             "predict, postprocess); decode (one thread) and batched inference rates; ceiling = the whole pipeline "
             "with every core busy, a decode thread pool overlapped with preprocess + inference at the batch size with "
             "the most img/s in the warm-up timings (ceiling_batch), back to back (the better of the server's pool "
             "size and one thread per core); of_ceiling = HTTP img/s over "
             "it; cpu_decode = every core decoding, the most a GPU server can be fed. HTTP overhead = HTTP at the "
             "lowest concurrency minus in process measured just before it on the same warm machine (median over "
             "sweeps).\n\n" + markdown_table(inproc_rows, list(inproc_rows[0]))
             + "\n\nImages sent:\n\n" + markdown_table(corpus_rows, list(corpus_rows[0])))
    if raw_rows:
        notes += ("\n\nRaw body against multipart, same server, same images:\n\n"
                  + markdown_table(raw_rows, list(raw_rows[0])))
    goals = int8_goals(results, concurrency=max(int(c) for c in args.concurrency.split(",")))
    if goals:
        notes += ("\n\nint8 vs fp32: in every sweep the fp32 and int8 servers of one configuration run back to back; "
                  "the ratio is the median of the sweeps' ratios.\n\n"
                  + markdown_table([{**g, "met": "yes" if g["met"] else "NO"} for g in goals],
                                   ["goal", "target", "measured", "met"]))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(out, name, config, {**results, **({"goals": goals} if goals else {})}, table,
                  plot=lambda p: _plot(results, p), notes=notes)
    print(table)
    print(notes)
    print(f"results in {out}")
    return 0


def runs_on(runtime: dict[str, Any]) -> str:
    """A server's GET /model "runtime" in a few words: "torch cuda fp16" or "onnxruntime CPUExecutionProvider"."""
    if not runtime:
        return "?"
    torch_info = runtime.get("torch")
    if torch_info:
        return f"torch {torch_info.get('device')} {torch_info.get('precision')}"
    return f"{runtime.get('backend', '?')} {','.join(runtime.get('providers') or [])}".strip()


def precisions_of(args: argparse.Namespace) -> list[str]:
    items = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not items or any(p not in ("fp32", "int8") for p in items):
        raise SystemExit(f"--precisions {args.precisions}: use fp32, int8 or fp32,int8")
    return items


def _model(name: str, work: Path, seed: int, precisions: Sequence[str] = ("fp32",),
           corpus: Path | None = None) -> tuple[dict[str, Path], list[bytes]]:
    """({result name: package} per precision, the images to send: Fashion-MNIST PNGs for a 28 px grey model, else
    JPEG photos of typical size, `typical_photos`). int8 only for resnet18 (the others are not exported from a run
    here)."""
    if name == "tiny":
        return {"tiny": make_tiny(work / "tiny", seed)}, tiny_images(64, seed)
    if name == "resnet18":
        return ({name + ("" if p == "fp32" else f"-{p}"): make_resnet18(work / f"resnet18-{p}", seed, p)
                 for p in precisions}, typical_photos(work, seed, corpus))
    path = Path(name)
    from ltserve.package import load_package

    spec = load_package(path).preprocess
    photos = spec.crop > 64 or spec.channels != 1
    return {path.name: path}, typical_photos(work, seed, corpus) if photos else tiny_images(64, seed)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (model, res) in zip(axes[0], results.items()):
        for key, rows in res["http"].items():
            ax.plot([r["concurrency"] for r in rows], [r["req_s"] for r in rows], marker="o", label=key)
        ax.axhline(res["in_process"]["ceiling_img_s"], color="grey", linestyle="--", label="in-process ceiling")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests / s")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# The alternative request path, measured against the in-process batcher (`--paths depends`):
# a front service decodes and postprocesses; a batchable BentoML API (adaptive batching by BentoML's dispatcher)
# runs the model in a second process, reached through bentoml.depends.
# ---------------------------------------------------------------------------------------------------------------------

try:
    import bentoml
except ImportError:  # the benchmark's other parts run without it
    bentoml = None

if bentoml is not None:
    from ltserve.runtime import Prediction

    def _bench_predictor(max_batch_size: int):
        from ltserve.runtime import Predictor

        return Predictor(os.environ["LTSERVE_MODEL"], threads=int(os.environ.get("LTSERVE_THREADS", "0")) or None,
                         max_batch_size=max_batch_size, backend=os.environ.get("LTSERVE_BACKEND", "onnxruntime"))

    @bentoml.service(name="ltserve_batched_model", workers=1)
    class BatchedModel:
        """uint8 images (N, crop, crop, C) -> logits (N, classes), batched by BentoML's adaptive dispatcher."""

        def __init__(self) -> None:
            self.predictor = _bench_predictor(int(os.environ.get("LTSERVE_MAX_BATCH_SIZE", "32")))

        # BentoML's max_latency_ms is a latency budget (503 beyond it), not a wait: give it room
        @bentoml.api(batchable=True, max_batch_size=int(os.environ.get("LTSERVE_MAX_BATCH_SIZE", "32")),
                     max_latency_ms=10_000)
        def predict(self, images: np.ndarray) -> np.ndarray:
            return self.predictor.predict(self.predictor.preprocess(list(images)))

    @bentoml.service(name="ltserve_depends_front", workers=1)
    class DependsFront:
        """POST /classify: decode here, predict in BatchedModel, postprocess here."""

        model = bentoml.depends(BatchedModel)

        def __init__(self) -> None:
            from ltserve.package import load_package

            self.meta = load_package(os.environ["LTSERVE_MODEL"])

        @bentoml.api(route="/classify")
        async def classify(self, image: Path) -> Prediction:
            from ltserve.runtime import postprocess
            from ltserve.preprocess import decode

            arr = await asyncio.to_thread(lambda: decode(image.read_bytes(), self.meta.preprocess))
            logits = await self.model.to_async.predict(arr[None])
            return postprocess(np.asarray(logits), self.meta.labels, self.meta.shot_groups, 5)[0]


if __name__ == "__main__":
    sys.exit(main())
