"""The service under abuse and faults, on real `bentoml serve` processes with real clients and sockets.

One server per module (`server`), configured with small limits so that each attack is cheap to mount here: a
decode budget of 20 MP per request, 3 s to send a request, 2 s to answer it, 32 open connections per worker. Each
test is one finding of issue 13, mounted at a small scale; the full-size figures are `benchmarks/abuse.py`'s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from ltserve.errors import ImageTooLarge
from ltserve.runtime import Predictor
from ltserve.serve.batcher import AsyncPredictor
from ltserve.serve.process import ServerProcess, free_port
from package_helpers import build_lsq_package, read_fashion

from benchmarks.loadgen import blank_png, png

REPO = Path(__file__).resolve().parents[2]
MAX_REQUEST_PIXELS = 20_000_000
RECEIVE_TIMEOUT_S = 3.0
TIMEOUT_S = 2.0
MAX_CONNECTIONS = 32


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
    env = server_env(package, max_request_pixels=MAX_REQUEST_PIXELS, receive_timeout_s=RECEIVE_TIMEOUT_S,
                     timeout_s=TIMEOUT_S, max_connections=MAX_CONNECTIONS)
    srv = ServerProcess(env, tmp / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()




def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, from Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    return float(sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                     if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())))


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


# -- 2. unknown paths: 404 JSON before BentoML, one metric series for all of them --------------------------------------


def test_unknown_paths_answer_404_json_and_add_no_metric_series(server):
    """2,000 distinct scanner paths: each answers 404 JSON; the workers' memory and /metrics stay flat."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i in range(300):  # warm-up: first-request allocations are not what is measured
            assert c.get(f"/warm-up/{i}").status_code == 404
        assert c.get("/classify").status_code == 405  # a served path with another method is not "unknown"
        before = c.get("/metrics").text
        rss = sum(p.memory_info().rss for p in server.workers())
        for i in range(2000):
            r = c.request("GET" if i % 2 else "POST", f"/scan-{i}/wp-login.php", params={"q": i})
            assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
        after = c.get("/metrics").text
        growth = sum(p.memory_info().rss for p in server.workers()) - rss
    assert "scan-" not in after and "warm-up" not in after
    assert metric(after, "ltserve_unmatched_requests_total") - metric(before, "ltserve_unmatched_requests_total") \
        == 2000
    assert abs(len(after) - len(before)) < 2000, (len(before), len(after))
    assert growth < 4 * 2**20, f"workers grew {growth / 2**20:.1f} MB over 2,000 unknown paths"


# -- 3. slow and half-sent requests: a receive deadline, a connection cap ----------------------------------------------


def _peek(sock: socket.socket) -> str:
    """What the server has done to a client socket so far, without consuming it: 'open', 'answered', 'closed'."""
    sock.settimeout(0.01)
    try:
        return "answered" if sock.recv(1, socket.MSG_PEEK) else "closed"
    except socket.timeout:
        return "open"
    except ConnectionResetError:
        return "closed"


def _outcome(sock: socket.socket) -> str:
    """How the server ended a client socket: the status line it answered ('HTTP/1.1 408'), 'eof' for a close
    without an answer, 'reset'; or 'open' when it has not closed it."""
    sock.settimeout(0.05)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        return "open"
    except ConnectionResetError:
        return data[:12].decode("latin-1") or "reset"
    return data[:12].decode("latin-1") or "eof"


def test_half_sent_requests_are_closed_at_the_deadline_and_health_keeps_answering(server, fashion_pngs):
    """400 connections that send nothing, half the headers, or half the body: /readyz answers throughout, a real
    request is served, the workers never hold more than their cap, and every connection is closed by the deadline
    (those that sent part of a request answered 408, 503 or 504 first)."""
    procs = server.workers()
    fds0 = {p.pid: p.num_fds() for p in procs}
    host, port = "127.0.0.1", server.port
    partial = [b"", b"POST /classify HTTP/1.1\r\nHost: x\r\n",
               b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: 5000\r\n\r\n--b\r\n"]
    socks, probes, peak = [], [], 0
    # each probe on a new connection, as a health checker makes them: an idle keep-alive connection owes a request
    # and is among the first to give way when a worker is full
    for i in range(400):
        s = socket.create_connection((host, port))
        if partial[i % 3]:
            s.sendall(partial[i % 3])
        socks.append(s)
        if i % 40 == 0:
            t = time.perf_counter()
            assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
            probes.append(time.perf_counter() - t)
            peak = max(peak, max(p.num_fds() - fds0[p.pid] for p in procs))
    last_opened = time.monotonic()
    r = httpx.post(server.url + "/classify", files={"image": ("a.png", fashion_pngs[0], "image/png")}, timeout=10)
    assert r.status_code == 200, r.text
    states_now = Counter(_peek(s) for s in socks)
    time.sleep(max(0.0, last_opened + RECEIVE_TIMEOUT_S + 1.0 - time.monotonic()))  # the last one's deadline, + 1 s
    states = Counter(_outcome(s) for s in socks)
    assert httpx.get(server.url + "/livez", timeout=5).status_code == 200
    for s in socks:
        s.close()
    assert max(probes) < 5.0, probes  # answered (a loaded machine may take seconds; not a latency bound)
    # bounded by the cap, not by the 400 connections: connections pushed out are closed on a later turn of the
    # event loop, which a loaded machine delays (measured up to cap + 20), so the bound allows the cap again
    assert peak <= 2 * MAX_CONNECTIONS, f"a worker held {peak} more files than before ({MAX_CONNECTIONS} allowed)"
    assert states_now["open"] <= len(procs) * MAX_CONNECTIONS, states_now
    assert states["open"] == 0, f"still open after the deadline: {states}"
    # 504: a half body is still arriving when the handler's time limit (2 s) passes, before the receive deadline
    assert set(states) <= {"eof", "reset", "HTTP/1.1 408", "HTTP/1.1 503", "HTTP/1.1 504"}, states


def test_the_connection_pushed_out_first_is_the_one_with_the_least_of_a_request_waiting():
    """When a worker is full, a connection whose whole request is waiting unread (a health probe accepted in a burst)
    goes last; an idle one, then half a head, then a head without its body go before it."""
    from ltserve.serve.connection import waiting_rank

    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    ranks = [waiting_rank(b""), waiting_rank(b"GET /readyz HTTP/1.1\r\nHo"), waiting_rank(head + b"12345"),
             waiting_rank(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
             waiting_rank(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"), waiting_rank(head + b"1234567890")]
    assert ranks == [0, 1, 2, 2, 3, 3]


def test_a_request_sent_within_the_deadline_is_served(server, fashion_pngs):
    """A client that pauses (less than the deadline) between headers and body is answered normally."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + fashion_pngs[1] + b"\r\n--b--\r\n")
    head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head)
        time.sleep(RECEIVE_TIMEOUT_S / 2)
        s.sendall(body)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_a_request_over_the_time_limit_answers_504_json_and_the_connection_closes(server):
    """A body still arriving after LTSERVE_TIMEOUT_S: 504 with an ErrorBody naming the limit, then the server
    closes the connection (the rest of the body will never be read)."""
    head = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=RECEIVE_TIMEOUT_S + 5) as s:
        s.sendall(head)
        t0 = time.monotonic()
        answer = b"".join(iter(lambda: s.recv(65536), b""))  # until the server closes the connection
        waited = time.monotonic() - t0
    status, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.1 504 Gateway Timeout", answer[:300]
    assert b"connection: close" in headers.lower()
    error = json.loads(body)
    assert error["error"] == "timeout" and "LTSERVE_TIMEOUT_S" in error["detail"], error
    assert TIMEOUT_S - 0.2 < waited < RECEIVE_TIMEOUT_S, f"answered after {waited:.2f} s"


def test_requests_beyond_the_connection_cap_answer_503_but_health_routes_pass():
    """The protocol on a real uvicorn server (in process): with 2 connections allowed, all busy, a third request
    answers 503 JSON and /livez still answers."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ltserve.serve.bentoml_seam import GuardedProtocol
    from ltserve.serve.connection import ConnectionLimits

    async def slow(request):
        await asyncio.sleep(1.5)
        return PlainTextResponse("done")

    async def livez(request):
        return PlainTextResponse("\n")

    class TwoConnections(GuardedProtocol):
        limits = ConnectionLimits(receive_timeout_s=5, max_connections=2)

    app = Starlette(routes=[Route("/slow", slow), Route("/livez", livez)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=TwoConnections, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"

        def get(path: str) -> httpx.Response:
            return httpx.get(url + path, timeout=10)

        with ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(get, "/slow") for _ in range(2)]
            deadline = time.monotonic() + 5
            while len(server.server_state.connections) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)  # both busy connections accepted before the third arrives
            third = get("/slow")
            health = get("/livez")
            assert [f.result().status_code for f in busy] == [200, 200]
        assert third.status_code == 503 and third.json()["error"] == "too_many_connections", third.text
        assert "LTSERVE_MAX_CONNECTIONS" in third.json()["detail"] and third.headers["connection"] == "close"
        assert health.status_code == 200
        assert get("/slow").status_code == 200  # room again
    finally:
        server.should_exit = True
        thread.join(10)


# -- 4. a worker's crash: two workers, so the other one answers --------------------------------------------------------


def test_killing_one_worker_under_load_leaves_the_service_answering(server, fashion_pngs):
    """kill -9 of one of the two workers while 4 clients classify: /livez and /readyz never fail, only requests
    the killed worker had in flight fail, and BentoML's supervisor starts a replacement (it looks for dead workers
    every 10 s: circus's check_delay as `bentoml serve` sets it)."""
    old = server.workers()
    assert len(old) == 2, "two workers by default on a machine with 2 cores"
    stop = threading.Event()
    failures: list[str] = []
    health: list[tuple[str, object, float]] = []

    def load(k: int) -> int:
        done = 0
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/classify", files={"image": ("a.png", fashion_pngs[(k + done) % 32], "image/png")})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                done += 1
        return done

    def probe() -> None:
        while not stop.is_set():
            for route in ("/livez", "/readyz"):
                try:
                    health.append((route, httpx.get(server.url + route, timeout=1).status_code, time.monotonic()))
                except httpx.HTTPError as exc:
                    health.append((route, repr(exc), time.monotonic()))
            time.sleep(0.05)

    with ThreadPoolExecutor(5) as pool:
        clients = [pool.submit(load, k) for k in range(4)]
        prober = pool.submit(probe)
        time.sleep(1.0)
        old[0].kill()
        killed_at = time.monotonic()
        time.sleep(3.0)
        stop.set()
        served = sum(f.result() for f in clients)
        prober.result()
    bad = [h for h in health if h[1] != 200]
    assert bad == [], f"health routes failed after the kill: {bad[:5]}"
    # probes answered after the kill, however loaded the machine is (the count per second is not checked)
    assert sum(t > killed_at for _, _, t in health) >= 2, health
    assert len(failures) <= 4, f"{len(failures)} of {served} requests failed: {failures[:4]}"
    while len(server.workers()) < 2 or not any(p.pid == httpx.get(server.url + "/model").json()["service"]["pid"]
                                              for p in server.workers() if p.pid != old[1].pid):
        assert time.monotonic() - killed_at < 15, "no replacement worker answered within 15 s of the kill"
        time.sleep(0.2)


# -- 5 and 6. a second server on the host; the supervisor killed with SIGKILL ------------------------------------------


def test_a_second_server_keeps_its_own_metrics_and_its_workers_die_with_its_supervisor(server, package, tmp_path,
                                                                                    fashion_pngs):
    """Starting a second `bentoml serve` leaves the first server's counters as they were (each server has its own
    metrics directory); SIGKILL of the second's supervisor takes its workers down within 10 s, port included."""
    for _ in range(3):
        assert httpx.post(server.url + "/classify", files={"image": ("a.png", fashion_pngs[0], "image/png")},
                          timeout=10).status_code == 200
    count = metric(httpx.get(server.url + "/metrics").text, "ltserve_requests_total", route="/classify")
    assert count >= 3
    second = ServerProcess(server_env(package), tmp_path / "second.log")
    orphans: list[psutil.Process] = []
    try:
        second.wait_ready()
        after = metric(httpx.get(server.url + "/metrics").text, "ltserve_requests_total", route="/classify")
        assert after >= count, f"the second server's start reset the first one's /classify count {count} -> {after}"
        assert metric(httpx.get(second.url + "/metrics").text, "ltserve_requests_total", route="/classify") == 0
        orphans = second.workers()
        metrics_dir = Path(orphans[0].environ()["LTSERVE_METRICS_DIR"])  # the supervisor gave it to its workers
        assert metrics_dir.is_dir() and "bentoml" not in str(metrics_dir)
        second.proc.kill()  # SIGKILL of the supervisor alone
        killed_at = time.monotonic()
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans):
            assert time.monotonic() - killed_at < 10.0, f"workers alive 10 s after their supervisor: {orphans}"
            time.sleep(0.05)
        with pytest.raises(httpx.ConnectError):
            httpx.get(second.url + "/livez", timeout=1)
        assert not metrics_dir.exists(), "the dead server's temporary metrics directory was left behind"
    finally:
        for p in orphans:
            if p.is_running():
                p.kill()
        second.stop()


def test_workers_still_starting_when_their_supervisor_is_killed_exit_too(package, tmp_path):
    """SIGKILL of the supervisor while its workers are still importing the service (before any answers): each
    worker learns the supervisor's pid from the environment, so it exits once it gets that far instead of serving on
    as an orphan whose parent was already init when it started watching."""
    server = ServerProcess(server_env(package), tmp_path / "early.log")
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = server.workers()
            time.sleep(0.005)
        assert len(workers) == 2, "the workers did not start"
        assert all(p.environ()["LTSERVE_SUPERVISOR_PID"] == str(server.proc.pid) for p in workers)
        server.proc.kill()
        killed_at = time.monotonic()
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers):
            assert time.monotonic() - killed_at < 30.0, f"workers alive 30 s after their supervisor: {workers}"
            time.sleep(0.05)
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
        server.stop()
