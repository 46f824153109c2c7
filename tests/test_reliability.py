"""The service under abuse and faults, on real `bentoml serve` processes with real clients and sockets.

One server per module (`server`), configured with small limits so that each attack is cheap to mount here: a decode
budget of 20 MP per request. Each test is one finding of issue 13, mounted at a small scale; the full-size figures
are `benchmarks/abuse.py`'s.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ltserve.errors import ImageTooLarge
from ltserve.runtime import Predictor
from ltserve.serve.batcher import AsyncPredictor
from ltserve.serve.process import ServerProcess
from package_helpers import build_lsq_package, read_fashion

REPO = Path(__file__).resolve().parents[1]
MAX_REQUEST_PIXELS = 20_000_000


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_lsq_package(tmp_path_factory.mktemp("models") / "fashion-lsq", n_train=3000)


def server_env(package: Path, **settings: object) -> dict[str, str]:
    """The environment of a test server: the package, and LTSERVE_<FIELD> for each setting."""
    return {"LTSERVE_MODEL": str(package), "OMP_NUM_THREADS": "1",
            **{f"LTSERVE_{k.upper()}": str(v) for k, v in settings.items()}}


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    srv = ServerProcess(server_env(package, max_request_pixels=MAX_REQUEST_PIXELS), tmp / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def blank_png(side: int) -> bytes:
    """A black side x side PNG: side**2 pixels to decode from a few kB on the wire (0.15 s for 6300 px here)."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fashion_pngs() -> list[bytes]:
    images, _ = read_fashion("t10k")
    return [png(a) for a in images[:32]]


# -- 1. decoding: a pixel budget per request, huge images on a lane of their own ---------------------------------------


def test_pixel_budget_refuses_before_decoding_and_small_requests_pass_huge_ones(package, fashion_pngs):
    """In process: a request over the budget is refused from its headers (nothing decoded: far faster than one
    decode); a small request sent while huge images decode is answered long before them."""
    predictor = Predictor(package, threads=1, max_batch_size=8)
    huge = blank_png(5000)  # 25 MP: ~0.1 s to decode on one core

    async def main() -> tuple[float, float, float]:
        engine = AsyncPredictor(predictor, decode_threads=2)
        try:
            t0 = time.perf_counter()
            with pytest.raises(ImageTooLarge, match="LTSERVE_MAX_REQUEST_PIXELS"):
                await engine.classify([huge] * 64, max_request_pixels=MAX_REQUEST_PIXELS * 10)
            refused = time.perf_counter() - t0
            big = asyncio.ensure_future(engine.classify([huge] * 6))
            await asyncio.sleep(0.02)  # the huge images are decoding
            t1 = time.perf_counter()
            assert len(await engine.classify(fashion_pngs[:1])) == 1
            small_s = time.perf_counter() - t1
            assert not big.done(), "the huge request finished first"
            await big
            return refused, small_s, time.perf_counter() - t1
        finally:
            engine.close()

    refused, small_s, big_s = asyncio.run(main())
    assert refused < 0.5, f"refusing 64 x 25 MP took {refused:.2f} s: it decoded"
    assert small_s < big_s / 4, f"small request {small_s:.3f} s behind huge ones ({big_s:.3f} s)"


def test_decode_flood_leaves_small_requests_fast(server, fashion_pngs):
    """Three clients send 64 blank 16 MP PNGs per request (1 GP, over the 20 MP budget: 413 from the headers) or
    one (under it: served) while a fourth classifies small images: its p99 stays under a second."""
    flood = [("images", (f"{i}.png", blank_png(4000), "image/png")) for i in range(64)]
    one = [("images", ("one.png", blank_png(4000), "image/png"))]
    stop = threading.Event()
    statuses: list[int] = []

    def flooder(files: list) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post("/classify_batch", files=files).status_code)

    latencies: list[float] = []
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(flooder, files) for files in (flood, flood, one)]
        time.sleep(1.0)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            t_end = time.monotonic() + 6
            i = 0
            while time.monotonic() < t_end:
                t = time.perf_counter()
                r = c.post("/classify", files={"image": ("a.png", fashion_pngs[i % 32], "image/png")})
                latencies.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                i += 1
        stop.set()
        for f in futures:
            f.result()
    p99 = float(np.percentile(latencies, 99))
    assert p99 < 1.0, f"p99 {p99:.2f} s over {len(latencies)} requests during the flood"
    assert set(statuses) == {200, 413} and statuses.count(413) >= 3, statuses
    r = httpx.post(server.url + "/classify_batch", files=flood[:2], timeout=30)
    assert r.status_code == 413 and "LTSERVE_MAX_REQUEST_PIXELS" in r.json()["detail"], r.text
