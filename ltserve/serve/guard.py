"""The request guard (ASGI middleware): everything a client can get wrong, answered 4xx with a JSON body before the
model sees the request; and the service's one error body."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ltserve.errors import InvalidInput
from ltserve.serve.settings import BATCH_ROUTE, PROTECTED_ROUTES, UPLOAD_FIELDS, ServiceSettings

current: dict[str, Any] = {}  # the service instance of this worker process, for the mounted ASGI routes


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body of this service: {"error": short code, "detail": what is wrong and how to fix it}."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


_ERROR_CODES = {400: "invalid_image", 413: "image_too_large", 415: "unsupported_format"}


def invalid_input_response(exc: InvalidInput) -> JSONResponse:
    """Map ltserve's input errors (InvalidImage 400, ImageTooLarge 413, UnsupportedFormat 415) to JSON."""
    return error_response(exc.status_code, _ERROR_CODES.get(exc.status_code, "invalid_input"), str(exc))


# ---------------------------------------------------------------------------------------------------------------------
# Request guard (ASGI middleware): everything a client can get wrong, answered 4xx before BentoML parses
# ---------------------------------------------------------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class RequestGuard:
    """Checks API key, content type, body size and the multipart fields of the upload routes, then answers them.

    The body is read here (counting streamed bytes against max_upload_bytes, whatever Content-Length says), parsed
    once and checked; the files' bytes go to the service's `answer`. A string in a file field (BentoML would fetch
    a URL given there) is refused, so nothing is ever fetched. Before the service instance exists, the checked body
    is replayed to BentoML's own handler instead.
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
                files = await self._check_form(scope, body, UPLOAD_FIELDS[path])
                service = current.get("service")
                if service is not None:  # answer here: see the module docstring (one parse, no temporary files)
                    response = await service.answer(path, files)
                    return await response(scope, receive, send)
                receive = _replay(body)
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

    async def _check_form(self, scope: dict, body: bytes, field: str) -> list[bytes]:
        """Parse the multipart body and check its fields; the uploaded files' bytes, in order."""
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
        request = Request({k: v for k, v in scope.items() if k != "app"}, _replay(body))  # no "app": Starlette
        try:                                                                       # then raises MultiPartException
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
            cap = self.settings.max_batch_images
            if len(files) > cap:
                raise _Reject(413, "too_many_images", f"{len(files)} images in one request; at most {cap} "
                                                      "(LTSERVE_MAX_BATCH_IMAGES)")
            return [await f.read() for f in files]
        finally:
            await form.close()


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive

