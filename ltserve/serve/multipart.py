"""One parse of a multipart/form-data body that is already in memory (RFC 7578): its parts' field names, file names
and bytes.

The service reads each upload once and parses it here once: no second parser, no temporary file. The delimiter of
a part is CRLF "--" boundary (RFC 2046 5.1.1), which the sender chose so that it occurs in no part, so splitting on
it is exact; the first delimiter may open the body without the CRLF. Anything else that does not follow the grammar
is a `MultipartError` (answered 400 by the service), never a server fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PARAM = re.compile(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,./:=? -]{1,70}$")  # RFC 2046 bchars; the last may not be a space


class MultipartError(ValueError):
    """The body is not the multipart/form-data its Content-Type announces (what is wrong, for a 400 answer)."""


@dataclass(frozen=True)
class Part:
    """One part of a form.

    Attributes:
        name: the form field (Content-Disposition `name`).
        filename: the uploaded file's name; None for a text field (no `filename` parameter).
        content_type: the part's Content-Type ("" when absent).
        data: the part's bytes.
    """

    name: str
    filename: str | None
    content_type: str
    data: bytes


def boundary_of(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type.

    Raises:
        MultipartError: no boundary, or one RFC 2046 does not allow.
    """
    params = dict((k.lower(), _unquote(v)) for k, v in _PARAM.findall(content_type))
    boundary = params.get("boundary", "")
    if not _BOUNDARY.match(boundary) or boundary.endswith(" "):
        raise MultipartError(f"the Content-Type has no valid boundary parameter: {content_type[:200]!r}")
    return boundary.encode("ascii")


def parse(body: bytes, boundary: bytes, max_parts: int) -> list[Part]:
    """The parts of a multipart body, in order.

    Args:
        body: the whole request body.
        boundary: from `boundary_of`.
        max_parts: most parts accepted; more raise (the caller's limit on files plus a few fields).

    Raises:
        MultipartError: what is wrong (no opening delimiter, an unterminated part, a part without a
            Content-Disposition name, more than `max_parts` parts).
    """
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2:start] != b"\r\n"):
        raise MultipartError("the body does not start with the boundary its Content-Type names")
    separator = b"\r\n" + delimiter
    parts: list[Part] = []
    pos = start + len(delimiter)
    while True:
        if body.startswith(b"--", pos):  # the closing delimiter; an epilogue may follow and is ignored
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):  # transport padding only, then CRLF
            raise MultipartError("a boundary line is not followed by CRLF")
        end = body.find(separator, eol)
        if end < 0:
            raise MultipartError("a part is not terminated by the boundary (the body is truncated?)")
        if len(parts) == max_parts:
            raise MultipartError(f"more than {max_parts} parts in the form")
        parts.append(_part(body, eol + 2, end))
        pos = end + len(separator)


def _part(body: bytes, begin: int, end: int) -> Part:
    split = body.find(b"\r\n\r\n", begin - 2, end)
    if split < 0:
        raise MultipartError("a part has no blank line between its headers and its content")
    headers: dict[str, str] = {}
    for line in body[begin:split].split(b"\r\n") if split > begin else []:
        key, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError(f"a part header is not 'Name: value': {line[:100]!r}")
        headers[key.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise MultipartError("a part has no 'Content-Disposition: form-data' header")
    params = dict((k.lower(), _unquote(v)) for k, v in _PARAM.findall(disposition))
    if "name" not in params:
        raise MultipartError("a part's Content-Disposition has no name")
    return Part(params["name"], params.get("filename"), headers.get("content-type", ""), body[split + 4:end])


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value
