"""ltserve's own HTTP routes, as one plain ASGI app in front of the server framework's: the hot path of every request.

`Front(behind, routes, ...)` answers the routes it is given and passes every other request on to `behind` (the
BentoML app: its health, metrics and documentation routes). For one of its routes it does, in this order, and
nothing more: match method and path; check the API key; read the body once, counting bytes against the upload
limit (413 from Content-Length or while streaming); call the route's one handler, under the time limit (504); send
the handler's `Answer`; count the request by route and status. A path that neither it nor `behind` serves is
answered 404 here, counted in one series whatever the path (scanners would otherwise grow per-path metrics).

Every error this layer and the handlers give is an `ErrorBody` (`{"error", "detail"}`), built by `error_answer`.
Handlers get an `HttpRequest` (method, path, lower-case headers, the body bytes, path parameters) and return an
`Answer` (status, JSON bytes, headers); they never touch ASGI messages.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from pydantic import BaseModel, Field

from starlette.routing import Match
from starlette.staticfiles import StaticFiles



class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer of this service."""

    error: str = Field(description="short machine-readable code, e.g. invalid_image, payload_too_large")
    detail: str = Field(description="what is wrong and how to fix it")


def error_json(error: str, detail: str) -> bytes:
    """An `ErrorBody` as JSON bytes (the one place it is serialised)."""
    return json.dumps({"error": error, "detail": detail}).encode()


@dataclass
class Answer:
    """What a handler answers: status, JSON body bytes, extra headers."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = b"application/json"


def json_answer(value: BaseModel | dict | list, status: int = 200) -> Answer:
    """A 200 (or `status`) JSON answer of a pydantic model or plain data."""
    if isinstance(value, BaseModel):
        return Answer(status, value.model_dump_json().encode())
    return Answer(status, json.dumps(value).encode())


def error_answer(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> Answer:
    """An `ErrorBody` answer."""
    return Answer(status, error_json(error, detail), [(k.lower().encode(), v.encode()) for k, v in
                                                      (headers or {}).items()])


class Reject(Exception):
    """Raised inside a handler (or by `read_form`) to answer an `ErrorBody` with this status."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.answer = error_answer(status, error, detail, headers)


@dataclass
class HttpRequest:
    """One request as a handler sees it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    params: dict[str, str]

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


Handler = Callable[[HttpRequest], Awaitable[Answer]]


@dataclass(frozen=True)
class Route:
    """A route of the front: `path` may hold `{name}` parameters (one path segment each).

    Attributes:
        methods: the HTTP methods it answers (others get 405).
        path: e.g. "/classify" or "/v2/models/{model}/infer".
        handler: the one handler of the route.
        protected: needs the API key when one is set.
        name: the route's label in metrics (defaults to `path`).
    """

    methods: tuple[str, ...]
    path: str
    handler: Handler
    protected: bool = True
    name: str = ""

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


class Front:
    """The ASGI app in front of `behind`: ltserve's routes here, everything else there (see the module docstring).

    Args:
        behind: the app that answers every other path (BentoML's).
        routes: ltserve's routes.
        api_key: the key protected routes need as `Authorization: Bearer <key>`; None: open.
        max_body_bytes: the largest request body (LTSERVE_MAX_UPLOAD_BYTES).
        timeout_s: a request not answered within this many seconds gets 504 (LTSERVE_TIMEOUT_S).
        serves: whether `behind` serves a request's path (None: it serves every path).
        on_answer: called with (route name, status, seconds) for every request a route answered (metrics).
        on_unmatched: called for every request answered 404 here (metrics).
    """

    def __init__(self, behind: Any, routes: Sequence[Route], *, api_key: str | None, max_body_bytes: int,
                 timeout_s: float, serves: Callable[[dict], bool] | None = None,
                 on_answer: Callable[[str, int, float], None] | None = None,
                 on_unmatched: Callable[[], None] | None = None) -> None:
        self.behind = behind
        self.exact = {r.path: r for r in routes if "{" not in r.path}
        self.patterns = [(r.pattern(), r) for r in routes if "{" in r.path]
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.serves = serves
        self.on_answer = on_answer
        self.on_unmatched = on_unmatched

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.behind(scope, receive, send)
        path = scope["path"]
        route, params = self.exact.get(path), {}
        if route is None:
            route, params = self._match(path)
        if route is None:
            if self.serves is None or self.serves(scope):
                return await self.behind(scope, receive, send)
            if self.on_unmatched is not None:
                self.on_unmatched()
            return await send_answer(send, error_answer(404, "not_found", f"no route {path[:200]!r}; the routes are "
                                                                    "listed at /docs.json (OpenAPI)"))
        started = time.perf_counter()
        answer = await self._answer(route, params, scope, receive)
        await send_answer(send, answer)
        if self.on_answer is not None:
            self.on_answer(route.name or route.path, answer.status, time.perf_counter() - started)

    def _match(self, path: str) -> tuple[Route | None, dict[str, str]]:
        for pattern, route in self.patterns:
            m = pattern.match(path)
            if m:
                return route, m.groupdict()
        return None, {}

    async def _answer(self, route: Route, params: dict[str, str], scope: dict, receive: Any) -> Answer:
        method = scope["method"]
        if method not in route.methods:
            return error_answer(405, "method_not_allowed", f"{route.path} answers {', '.join(route.methods)}",
                                {"Allow": ", ".join(route.methods)})
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key is not None and route.protected and not self._authorised(headers.get("authorization", "")):
            return error_answer(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`",
                                {"WWW-Authenticate": 'Bearer realm="ltserve"'})
        try:
            return await _within(self.timeout_s, self._run(route, params, scope, receive, headers))
        except Reject as r:
            return r.answer
        except asyncio.TimeoutError:  # TimeoutError on 3.11+ (the same class)
            return error_answer(504, "timeout", f"no answer within {self.timeout_s:g} s (LTSERVE_TIMEOUT_S): the "
                                "server is overloaded or the upload too slow; retry, with fewer images per request",
                                {"Connection": "close"})

    async def _run(self, route: Route, params: dict[str, str], scope: dict, receive: Any,
                   headers: dict[str, str]) -> Answer:
        method = scope["method"]
        body = await self._read_body(headers, receive) if method in ("POST", "PUT") else b""
        return await route.handler(HttpRequest(method, scope["path"], headers, body, params))

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes:
        limit = self.max_body_bytes
        too_big = Reject(413, "payload_too_large", f"request body exceeds {limit} bytes (LTSERVE_MAX_UPLOAD_BYTES)",
                         {"Connection": "close"})  # the rest of an oversized body is not read
        length = headers.get("content-length", "")
        if length:
            if not length.isdigit():
                raise Reject(400, "bad_request", f"invalid Content-Length {length!r}")
            if int(length) > limit:
                raise too_big
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Reject(400, "bad_request", "client disconnected before the body was complete")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:  # chunked uploads, or a Content-Length that lied
                raise too_big
            if not message.get("more_body", False):
                return b"".join([*chunks, chunk]) if chunks else chunk  # one message (the usual case): no copy
            chunks.append(chunk)


async def _within(seconds: float, work: Awaitable[Answer]) -> Answer:
    """`await work`, cancelled after `seconds` (asyncio.TimeoutError): `asyncio.timeout` where it exists (Python
    3.11+: one timer, cancelled on exit, no extra task), else `asyncio.wait_for`."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:
        return await asyncio.wait_for(work, seconds)
    async with timeout(seconds):
        return await work


async def send_answer(send: Any, answer: Answer) -> None:
    """Send `answer` as the response of the current request (two ASGI messages)."""
    headers = [(b"content-type", answer.content_type), (b"content-length", str(len(answer.body)).encode()),
               *answer.headers]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


class StarletteRoutes:
    """Which paths a Starlette app's routes serve (Starlette's own matching), so that `Front` can answer the rest.
    Call the instance with a request scope."""

    def __init__(self, app: Any) -> None:
        router = getattr(app, "router", None)
        self.routes = list(getattr(router, "routes", None) or [])
        self.open = not self.routes  # not a Starlette app: let everything through

    def __call__(self, scope: dict) -> bool:
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
