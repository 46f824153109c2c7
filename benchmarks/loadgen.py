"""What the soak and abuse benchmarks share: a minimal asyncio HTTP/1.1 client (pre-built request bytes, keep-alive,
reconnecting when the server closes), the uploads they send, and the memory of a server's process tree.

The client is small on purpose: on a 2-core machine the load generator shares the cores with the server, and
httpx's per-request cost would be a large part of the measurement.
"""

from __future__ import annotations

import asyncio
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

BOUNDARY = "ltservebench7f3a"


@dataclass(frozen=True)
class Upload:
    """One request to send again and again, and the status a correct server answers it with.

    Attributes:
        kind: short name, for the tables ("png", "truncated_jpeg", ...).
        raw: the whole HTTP/1.1 request, keep-alive.
        expected: the HTTP status a correct server answers.
    """

    kind: str
    raw: bytes
    expected: int


def multipart(port: int, parts: list[tuple[str, str, bytes]], route: str = "/classify",
              content_type: str | None = None) -> bytes:
    """The bytes of one keep-alive multipart POST of `parts` (field, filename, content)."""
    body = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for field, name, data in parts) + f"--{BOUNDARY}--\r\n".encode()
    ctype = content_type or f"multipart/form-data; boundary={BOUNDARY}"
    head = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


def get(port: int, path: str) -> bytes:
    """The bytes of one keep-alive GET."""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n\r\n".encode()


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def blank_png(side: int) -> bytes:
    """A black side x side PNG: side**2 pixels to decode from a few kB on the wire."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def fashion_pngs(n: int, seed: int) -> list[bytes]:
    """Fashion-MNIST test images as PNG bytes (28x28 noise when the data set is absent)."""
    try:
        from ltserve.data import find_fashion_mnist, read_idx

        arrays = read_idx(find_fashion_mnist() / "t10k-images-idx3-ubyte.gz")[:n]
    except Exception:  # the benchmark still runs without the data set
        arrays = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return [png(a) for a in arrays]


def mixed_uploads(port: int, seed: int) -> list[Upload]:
    """What the soak sends, valid and invalid, with the status each must get: 28x28 PNGs one by one and four at a
    time (200), a truncated JPEG, random bytes, text in the file field, a missing field (400), an unsupported
    format and a wrong content type (415), an image over the pixel cap (413), an unknown path (404)."""
    from PIL import Image

    pngs = fashion_pngs(32, seed)
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    ico = io.BytesIO()
    Image.new("L", (16, 16)).save(ico, format="ICO")
    uploads = [Upload("png", multipart(port, [("image", f"{i}.png", p)]), 200) for i, p in enumerate(pngs)]
    uploads += [Upload("batch4", multipart(port, [("images", f"{i}.png", pngs[(i + k) % 32]) for k in range(4)],
                                           "/classify_batch"), 200) for i in range(0, 32, 4)]
    invalid = [
        Upload("truncated_jpeg", multipart(port, [("image", "t.jpg", jpeg[: len(jpeg) // 2])]), 400),
        Upload("random_bytes", multipart(port, [("image", "r.png", rng.bytes(3000))]), 400),
        Upload("missing_field", multipart(port, [("file", "a.png", pngs[0])]), 400),
        Upload("ico", multipart(port, [("image", "a.ico", ico.getvalue())]), 415),
        Upload("wrong_type", multipart(port, [("image", "a.png", pngs[0])], content_type="text/plain"), 415),
        Upload("over_pixel_cap", multipart(port, [("image", "b.png", blank_png(6400))]), 413),
        Upload("unknown_path", get(port, "/wp-login.php"), 404),
    ]
    # one invalid request in four
    return uploads + invalid * max(1, round(len(uploads) / (3 * len(invalid))))


class Connection:
    """One keep-alive HTTP/1.1 connection that reconnects after the server closes it."""

    def __init__(self, port: int, timeout_s: float = 60.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send `raw`, return (status, headers in lower case, body).

        Raises:
            OSError, asyncio.IncompleteReadError, asyncio.TimeoutError: the connection failed (it is dropped).
        """
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            self._writer.write(raw)
            status, headers, body = await asyncio.wait_for(_read_response(self._reader), self.timeout_s)
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers, await reader.readexactly(int(headers.get("content-length", 0)))


def tree_memory(pid: int) -> dict[str, Any]:
    """Memory of a process and all its descendants: RSS and PSS (shared pages split among the processes that map
    them, so the sum over a tree is what it really holds) in MiB, per process and in all."""
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    rows = []
    for p in procs:
        try:
            full = p.memory_full_info()
            rows.append({"pid": p.pid, "name": _role(p), "rss_mb": full.rss / 2**20,
                         "pss_mb": getattr(full, "pss", full.rss) / 2**20})
        except psutil.Error:  # gone between the listing and the read (a restarted worker)
            pass
    return {"rss_mb": sum(r["rss_mb"] for r in rows), "pss_mb": sum(r["pss_mb"] for r in rows),
            "processes": rows}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its living descendants."""
    import psutil

    total = 0.0
    for p in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # gone between the listing and the read
            pass
    return total


def _role(p: Any) -> str:
    cmd = " ".join(p.cmdline())
    if "_bentoml_impl.worker.service" in cmd:
        return "worker"
    return "supervisor" if "bentoml" in cmd else os.path.basename(p.name())
