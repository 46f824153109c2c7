"""The service's ASGI middleware and its one error body, `ErrorBody`: the request guard (everything a client can get
wrong in the request itself, answered 4xx with a JSON body before BentoML parses it) and the time limit (504)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from ltserve.errors import InvalidInput
from ltserve.preprocess import FORMAT_NAMES, IMAGE_MEDIA_TYPES
from ltserve.serve.settings import BATCH_ROUTE, PROTECTED_ROUTES, RAW_ROUTE, UPLOAD_FIELDS, ServiceSettings

logger = logging.getLogger(__name__)

RAW_MEDIA_TYPES = (*IMAGE_MEDIA_TYPES, "application/octet-stream")
"""What a raw-body request (RAW_ROUTE) may declare as its Content-Type; the format is sniffed from the bytes."""


class ErrorBody(BaseModel):
    """The body of every 4xx answer of this service."""

    error: str = Field(description="short machine-readable code, e.g. invalid_image, payload_too_large")
    detail: str = Field(description="what is wrong and how to fix it")


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An `ErrorBody` as an HTTP answer (what the guard and the mounted routes send)."""
    return JSONResponse(ErrorBody(error=error, detail=detail).model_dump(), status_code=status, headers=headers)


_ERROR_CODES = {400: "invalid_image", 413: "image_too_large", 415: "unsupported_format"}


def invalid_input_error(exc: InvalidInput) -> tuple[int, ErrorBody]:
    """The HTTP status and body of ltserve's input errors (InvalidImage 400, ImageTooLarge 413,
    UnsupportedFormat 415)."""
    return exc.status_code, ErrorBody(error=_ERROR_CODES.get(exc.status_code, "invalid_input"), detail=str(exc))


# ---------------------------------------------------------------------------------------------------------------------
# Time limit (ASGI middleware): 504 with an ErrorBody, and the connection closed
# ---------------------------------------------------------------------------------------------------------------------


class TimeLimit:
    """Answers 504 with an `ErrorBody` and `Connection: close` when a request is not answered within `timeout_s`
    seconds (LTSERVE_TIMEOUT_S), and cancels its handler.

    BentoML's own time limit (`traffic.timeout`) answers 504 with `{"error"}` and no detail, and keeps the
    connection open, though the request's body may not have been read to its end: the service sets BentoML's a
    second later, as a backstop (built as `TrafficTimeout`, see there), and this one answers first. A response that
    started in time is not cut.
    """

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, send_tracked))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
            if done or started:  # answered, or its answer is under way: let it finish (re-raises its error)
                return await task
        finally:
            if not task.done():  # too late, or this request itself was cancelled
                task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # let the cancelled handler unwind first
        detail = (f"no answer within {self.timeout_s:g} s (LTSERVE_TIMEOUT_S): the server is overloaded or the upload "
                  "too slow; retry, with fewer images per request")
        await error_response(504, "timeout", detail, {"Connection": "close"})(scope, receive, send)


class TrafficTimeout(TimeLimit):
    """What BentoML builds for `traffic.timeout` once `replace_bentoml_timeout` has run: a `TimeLimit` (504
    `ErrorBody`, connection closed) of that many seconds, whose timer is cancelled when the answer is sent.

    BentoML 1.4's own `TimeoutMiddleware` (bentoml/_internal/server/http/traffic.py) schedules `loop.call_later`
    per request and never cancels it: the timer handle holds a copy of the request task's context (the
    OpenTelemetry span and what it references) for the whole timeout after the answer. Measured with tracemalloc on
    one worker under the soak's mix: about 13 kB per request still held, so rate x timeout of them at any time
    (tens of MB per worker at 180 requests/s and 31 s), and the CPython allocator's arenas, pinned by these
    long-lived objects between short-lived ones, kept growing (82 -> 118 MiB over 30,000 requests at idle, with
    the live Python objects unchanged).
    """

    def __init__(self, app: Any, timeout: float) -> None:  # BentoML passes `timeout=`
        super().__init__(app, timeout)


def replace_bentoml_timeout() -> bool:
    """Make BentoML build `TrafficTimeout` for a service's `traffic.timeout` (it imports its middleware by name
    from `bentoml._internal.server.http.traffic` when it builds the app, so this must run before that: at the
    service's import).

    Returns:
        True when replaced; False (with a warning) where this BentoML has no such middleware to replace.
    """
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:
        traffic = None
    if traffic is None or not hasattr(traffic, "TimeoutMiddleware"):
        logger.warning("bentoml has no bentoml._internal.server.http.traffic.TimeoutMiddleware: its traffic timeout "
                       "is left as it is")
        return False
    traffic.TimeoutMiddleware = TrafficTimeout
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Request guard (ASGI middleware): everything a client can get wrong, answered 4xx before BentoML parses
# ---------------------------------------------------------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class RequestGuard:
    """Checks API key, content type, body size and the multipart fields of the upload routes, then passes the
    request on; it never answers a request that passed.

    The raw-body route (RAW_ROUTE: the image bytes are the body) gets the same key and size checks, and its
    Content-Type must be an image media type or application/octet-stream (`RAW_MEDIA_TYPES`); there is no form to
    check.

    The body is read here (counting streamed bytes against max_upload_bytes, whatever Content-Length says), parsed
    and checked: the upload field is present and holds files only (a string there is refused: BentoML would fetch
    a URL given in a file field), no other field, one file for /classify (BentoML would silently keep the first).
    The checked body is then replayed to BentoML, whose handler parses it into the `@bentoml.api` method's typed
    arguments. What holds for every caller of the method, HTTP or Python (the batch cap, whether the bytes are an
    image), is answered by the method itself.
    """

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings
        self._key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        try:
            if self._key is not None and path in PROTECTED_ROUTES and scope.get("method") != "OPTIONS":
                self._check_key(scope)
            if path in UPLOAD_FIELDS and scope.get("method") == "POST":
                body = await self._read_body(scope, receive)
                await self._check_form(scope, body, UPLOAD_FIELDS[path])
                receive = _replay(body, receive)
            elif path == RAW_ROUTE and scope.get("method") == "POST":
                body = await self._read_body(scope, receive)
                _check_raw(scope, body)
                receive = _replay(body, receive)
        except _Reject as r:
            headers = {"WWW-Authenticate": 'Bearer realm="ltserve"'} if r.status == 401 else None
            if r.status == 413:
                headers = {"Connection": "close"}  # the rest of an oversized body is not read
            return await error_response(r.status, r.error, r.detail, headers)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check_key(self, scope: dict) -> None:
        auth = _header(scope, b"authorization")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise _Reject(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`")

    async def _read_body(self, scope: dict, receive: Any) -> bytes:
        limit = self.settings.max_upload_bytes
        too_big = _Reject(413, "payload_too_large", f"request body exceeds {limit} bytes (LTSERVE_MAX_UPLOAD_BYTES)")
        length = _header(scope, b"content-length")
        if length:
            if not length.isdigit():
                raise _Reject(400, "bad_request", f"invalid Content-Length {length!r}")
            if int(length) > limit:
                raise too_big
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reject(400, "bad_request", "client disconnected before the body was complete")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:  # chunked uploads, or a Content-Length that lied
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _check_form(self, scope: dict, body: bytes, field: str) -> None:
        """Parse the multipart body and check its fields (the handler parses it again into typed arguments)."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException

        ctype = _header(scope, b"content-type")
        media = ctype.split(";")[0].strip().lower()
        example = f"curl -F {field}=@photo.jpg URL"
        if not body:
            raise _Reject(400, "empty_body", f"the request body is empty; send multipart/form-data with a file in "
                                             f"field {field!r} ({example})")
        if media != "multipart/form-data":
            raise _Reject(415, "unsupported_media_type", f"Content-Type {ctype or '(missing)'!r} is not accepted; send "
                                                         f"multipart/form-data with a file in field {field!r} "
                                                         f"({example})")
        # no "app" in the scope: Starlette then raises MultiPartException instead of an HTTPException
        request = Request({k: v for k, v in scope.items() if k != "app"}, _replay(body, None))
        try:
            form = await request.form(max_files=1000, max_fields=100)
        except MultiPartException as exc:
            status = 413 if "Too many files" in exc.message else 400
            raise _Reject(status, "bad_multipart", f"cannot parse the multipart body: {exc.message}") from None
        except Exception as exc:  # any other parser failure is still a malformed body, not a server fault
            raise _Reject(400, "bad_multipart", f"cannot parse the multipart body: {exc}") from None
        try:
            keys = set(form.keys())
            values = form.getlist(field)
            files = [v for v in values if isinstance(v, UploadFile)]
            extra = sorted(keys - {field})
            if not values:
                raise _Reject(400, "missing_field", f"no file in field {field!r} (got fields {sorted(keys)}); "
                                                    f"{example}")
            if len(files) != len(values):
                raise _Reject(400, "not_a_file", f"field {field!r} must hold uploaded files, but it holds text "
                                                 "(URLs are never fetched: upload the image bytes)")
            if extra:
                raise _Reject(400, "unknown_field", f"unexpected field(s) {extra}; only {field!r} is accepted")
            if field == "image" and len(files) > 1:
                raise _Reject(400, "too_many_files", f"/classify takes one image, got {len(files)}; use "
                                                     f"{BATCH_ROUTE} with repeated field 'images'")
        finally:
            await form.close()


def _check_raw(scope: dict, body: bytes) -> None:
    """A raw-body request: a body, and an image Content-Type (BentoML would read any other, multipart or JSON, its
    own way)."""
    ctype = _header(scope, b"content-type")
    media = ctype.split(";")[0].strip().lower()
    example = f"curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg URL{RAW_ROUTE}"
    if not body:
        raise _Reject(400, "empty_body", f"the request body is empty; send the image bytes as the body ({example})")
    if media not in RAW_MEDIA_TYPES:
        raise _Reject(415, "unsupported_media_type", (
            f"Content-Type {ctype or '(missing)'!r} is not accepted on {RAW_ROUTE}; send the bytes of a "
            f"{FORMAT_NAMES} image with its type ({', '.join(RAW_MEDIA_TYPES)}) ({example})"))


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that gives the already-read body once, then waits on the connection's own `receive` (which
    reports the client's disconnect, as ASGI servers do after the body); without one, a disconnect."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive() if receive is not None else {"type": "http.disconnect"}

    return replay

