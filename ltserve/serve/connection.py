"""The HTTP connection layer of a service worker: uvicorn's h11 protocol with a deadline for receiving each request,
a cap on open connections, and unknown paths answered before BentoML.

uvicorn has no timeout for receiving a request: `timeout_keep_alive` only covers the idle time after a response and
every byte received resets it, and a connection that sends nothing, or half a request, is held until the client
goes away. ASGI middleware cannot help, since it runs only once the headers are complete. So `GuardedH11Protocol`
subclasses uvicorn's `H11Protocol` (`uvicorn.protocols.http.h11_impl`) and keeps, per worker, the connections that
owe a request:

- a connection owes a request from the moment it is ready for one (accepted, or its previous response sent) until
  h11 reports the request complete, headers and body (`their_state` DONE); idle time counts;
- one that has not completed its request `receive_timeout_s` after it became ready is closed; if it had sent part of
  one it is first answered 408 with an `ErrorBody` (a request the app was already reading sees a disconnect);
- when a connection arrives beyond `max_connections` open ones, the oldest connection still owing a request is
  answered 503 (or, if it sent nothing, closed) to make room: slow or idle clients give way to new ones, so a flood
  of half-sent requests can neither exhaust the worker's open files nor lock out a health probe, which sends its
  request at once. Among the `EVICTION_SCAN` oldest, the one with the least of a request waiting unread in the
  kernel goes first (nothing, then part of a head, then a head without all its body, then a whole request): during
  a burst the worker accepts many connections before it reads any, and a probe that has already sent its request
  would otherwise be dropped with the flood;
- a request that arrives while more than `max_connections` connections are open anyway (all of them busy with
  requests being answered) is answered 503, except the health and metrics routes (`OPEN_PATHS`).

Before the request reaches BentoML, the protocol's gate also answers a path that no route of the app serves with a
404 `ErrorBody` and counts it in `ltserve_unmatched_requests_total`: BentoML labels its request metrics with the raw
path, so every distinct unknown path would otherwise add metric series to the worker for good (measured: 20,000
scanner paths added 388 MB and made /metrics 19 MB).

`install(limits)` makes it the protocol of every uvicorn server in this process that uses the default `http="auto"`
(BentoML's worker builds its `uvicorn.Config` without an `http` argument); the service calls it in its workers.
"""

from __future__ import annotations

import asyncio
import http
import json
import re
import socket
import struct
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # not POSIX: no look at unread bytes, the oldest connection goes
    _FIONREAD = None

OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
"""Answered even when the worker holds more than `max_connections` connections: probes and scrapers must see it."""

PROTOCOL = "ltserve.serve.connection:GuardedH11Protocol"

EVICTION_SCAN = 32
"""How many of the oldest connections owing a request are compared when one must give way (`_make_room`)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What one worker allows its connections.

    Attributes:
        receive_timeout_s: seconds a connection has to send a whole request (headers and body), counted from when it
            is ready for one (LTSERVE_RECEIVE_TIMEOUT_S).
        max_connections: open connections per worker; beyond it the oldest one still owing a request is dropped,
            and requests other than `OPEN_PATHS` answer 503 while all are busy (LTSERVE_MAX_CONNECTIONS).
    """

    receive_timeout_s: float = 30.0
    max_connections: int = 1024


def install(limits: ConnectionLimits) -> None:
    """Make `GuardedH11Protocol`, with `limits`, the HTTP protocol of uvicorn servers started in this process with
    the default `http="auto"` (uvicorn looks the name up in `uvicorn.config.HTTP_PROTOCOLS` when it loads)."""
    import uvicorn.config

    GuardedH11Protocol.limits = limits
    uvicorn.config.HTTP_PROTOCOLS["auto"] = PROTOCOL


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a receive deadline per request, a per-worker connection cap and an unknown-path
    gate (see the module docstring). One instance per connection, as uvicorn makes them."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app_behind_gate = self.app
        self.app = self._gate  # uvicorn runs `self.app` for each request of this connection
        self._deadline: asyncio.TimerHandle | None = None
        self._got_bytes = False  # since the connection became ready for its current request
        self._fd = -1

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        ledger = _ledger(self.server_state)
        excess = len(self.connections) - len(ledger.closing) - self.limits.max_connections
        while excess > 0 and ledger.owing:
            _make_room(ledger.owing)._drop(503, "too_many_connections", (
                f"this worker holds more than {self.limits.max_connections} open connections "
                "(LTSERVE_MAX_CONNECTIONS) and this one had not sent its request: retry"))
            excess -= 1
        self._owe_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._paid()
        _ledger(self.server_state).closing.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._got_bytes = False
            self._follow_request()

    # -- the receive deadline -----------------------------------------------------------------------------------------

    def _follow_request(self) -> None:
        """Owe a request while h11 waits for one or for its body; stop owing once it is complete."""
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            if self._deadline is None:
                self._owe_request()
        else:
            self._paid()

    def _owe_request(self) -> None:
        self._deadline = self.loop.call_later(self.limits.receive_timeout_s, self._on_deadline)
        _ledger(self.server_state).owing[self] = None

    def _paid(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        _ledger(self.server_state).owing.pop(self, None)

    def _on_deadline(self) -> None:
        self._deadline = None
        self._drop(408, "request_timeout", (
            f"the request was not received in full within {self.limits.receive_timeout_s:g} s "
            "(LTSERVE_RECEIVE_TIMEOUT_S); send it at once, or put a proxy that buffers uploads in front"))

    def _drop(self, status: int, error: str, detail: str) -> None:
        """Close this connection, answering `status` first if it sent part of a request and no response started."""
        self._paid()
        if self.transport.is_closing():
            return
        answer = self._got_bytes
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            answer = answer and not cycle.response_started
            cycle.disconnected = True  # the app reading this request's body gets http.disconnect; its sends drop
            cycle.message_event.set()
        if answer:
            self.transport.write(_raw_answer(status, error, detail))
        self.transport.close()
        _ledger(self.server_state).closing.add(self)

    # -- the gate: over the connection cap, and unknown paths -------------------------------------------------------

    async def _gate(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path not in OPEN_PATHS and len(self.connections) > self.limits.max_connections:
                response = _error(503, "too_many_connections", (
                    f"this worker holds more than {self.limits.max_connections} open connections, all busy "
                    "(LTSERVE_MAX_CONNECTIONS): retry shortly"), {"Connection": "close", "Retry-After": "1"})
                return await response(scope, receive, send)
            if not _routes(self.config.app).serves(scope):
                _count_unmatched()
                response = _error(404, "not_found", (
                    f"no route {path[:200]!r}; the routes are listed at /docs.json (OpenAPI)"))
                return await response(scope, receive, send)
        await self._app_behind_gate(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------

class _Ledger:
    """Per uvicorn server (its ServerState): the connections owing a request, oldest first (a dict keeps insertion
    order), and those this module has closed that the event loop has not yet reported lost (uvicorn counts them
    open until then; without them a burst would push out far more connections than it needs to)."""

    def __init__(self) -> None:
        self.owing: dict[GuardedH11Protocol, None] = {}
        self.closing: set[GuardedH11Protocol] = set()


_LEDGERS: weakref.WeakKeyDictionary[Any, _Ledger] = weakref.WeakKeyDictionary()


def _ledger(server_state: Any) -> _Ledger:
    ledger = _LEDGERS.get(server_state)
    if ledger is None:
        ledger = _LEDGERS[server_state] = _Ledger()
    return ledger


def _make_room(owing: dict[GuardedH11Protocol, None]) -> GuardedH11Protocol:
    """The connection to drop, among the `EVICTION_SCAN` oldest owing a request: the oldest of those with the least
    of a request waiting unread in the kernel (`_waiting_rank`); one with nothing waiting (idle, or what it sent has
    been read and is not a whole request) at once."""
    best, best_rank = next(iter(owing)), 4
    for i, conn in enumerate(owing):
        if i >= EVICTION_SCAN:
            break
        rank = _waiting_rank(_peek(conn._fd))
        if rank < best_rank:
            best, best_rank = conn, rank
            if rank == 0:
                break
    return best


def _waiting_rank(waiting: bytes) -> int:
    """How much of a request unread bytes hold: 0 nothing, 1 part of a head, 2 a head whose body is not all there,
    3 a whole request."""
    if not waiting:
        return 0
    head, sep, body = waiting.partition(b"\r\n\r\n")
    if not sep:
        return 1
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    chunked = re.search(rb"(?im)^transfer-encoding:.*chunked", head)
    if chunked or (length and len(body) < int(length.group(1))):
        return 2
    return 3


def _peek(fd: int, size: int = 8192) -> bytes:
    """Up to `size` bytes received on socket `fd` that nobody has read yet, left in place; b"" when there are none
    or they cannot be seen (not POSIX)."""
    if fd < 0 or _FIONREAD is None:
        return b""
    try:
        if not struct.unpack("i", fcntl.ioctl(fd, _FIONREAD, b"\0\0\0\0"))[0]:  # cheap: most have none
            return b""
        sock = socket.socket(fileno=fd)  # borrowed: detached below, so the fd stays the transport's
        try:
            return sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        finally:
            sock.detach()
    except OSError:
        return b""


def _raw_answer(status: int, error: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response with an ErrorBody that closes the connection, as bytes: written directly, because
    h11 cannot answer a request whose headers it has not parsed."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n")
    return head.encode("ascii") + body


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class _Routes:
    """Which paths an app's routes serve (Starlette's own matching), so that the gate can answer the rest."""

    def __init__(self, app: Any) -> None:
        router = getattr(app, "router", None)
        self.routes = list(getattr(router, "routes", None) or [])
        self.open = not self.routes  # not a Starlette app: let everything through

    def serves(self, scope: dict) -> bool:
        if self.open or self._match(scope):
            return True
        path = scope["path"]
        # Starlette redirects /route/ to /route (and back): those paths are served, with a redirect
        other = path.rstrip("/") if path.endswith("/") else path + "/"
        return other != path and bool(other) and self._match({**scope, "path": other})

    def _match(self, scope: dict) -> bool:
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.NONE:
                continue
            app = getattr(route, "app", None)
            if isinstance(app, StaticFiles):  # a mount serves only the files that exist under it
                child_scope = {**scope, **child}
                return app.lookup_path(app.get_path(child_scope))[1] is not None
            return True
        return False


_ROUTES: weakref.WeakKeyDictionary[Any, _Routes] = weakref.WeakKeyDictionary()


def _routes(app: Any) -> _Routes:
    """The route table of `app`, read once (the routes are final once the server runs)."""
    routes = _ROUTES.get(app)
    if routes is None:
        routes = _ROUTES[app] = _Routes(app)
    return routes


def _count_unmatched() -> None:
    from ltserve.serve.metrics import service_metrics

    service_metrics()["unmatched"].inc()
