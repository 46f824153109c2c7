"""The connection policy of a service worker: a deadline for receiving each request and a cap on open connections,
decided here and enforced by the HTTP protocol in `ltserve.serve.bentoml_seam` (the only module that touches the
server's internals).

uvicorn has no timeout for receiving a request: `timeout_keep_alive` only covers the idle time after a response and
every byte received resets it, and a connection that sends nothing, or half a request, is held until the client
goes away. ASGI middleware cannot help, since it runs only once the headers are complete. So the protocol keeps,
per worker, the connections that owe a request (`Ledger`):

- a connection owes a request from the moment it is ready for one (accepted, or its previous response sent) until
  the parser reports the request complete, headers and body; idle time counts;
- one that has not completed its request `receive_timeout_s` after it became ready is closed; if it had sent part of
  one it is first answered 408 with an `ErrorBody` (`raw_answer`; a request the app was already reading sees a
  disconnect);
- when a connection arrives beyond `max_connections` open ones, the oldest connection still owing a request is
  answered 503 (or, if it sent nothing, closed) to make room: slow or idle clients give way to new ones, so a flood
  of half-sent requests can neither exhaust the worker's open files nor lock out a health probe, which sends its
  request at once. Among the `EVICTION_SCAN` oldest, the one with the least of a request waiting unread in the
  kernel goes first (`make_room`: nothing, then part of a head, then a head without all its body, then a whole
  request): during a burst the worker accepts many connections before it reads any, and a probe that has already
  sent its request would otherwise be dropped with the flood;
- a request that arrives while more than `max_connections` connections are open anyway (all of them busy with
  requests being answered) is answered 503, except the health and metrics routes (`OPEN_PATHS`).
"""

from __future__ import annotations

import http
import re
import socket
import struct
import weakref
from dataclasses import dataclass
from typing import Any

from ltserve.serve.http import error_json

try:
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # not POSIX: no look at unread bytes, the oldest connection goes
    _FIONREAD = None

OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
"""Answered even when the worker holds more than `max_connections` connections: probes and scrapers must see it."""

EVICTION_SCAN = 32
"""How many of the oldest connections owing a request are compared when one must give way (`make_room`)."""


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


TOO_MANY_CONNECTIONS = "too_many_connections"


def over_cap_detail(limit: int, busy: bool) -> str:
    """The detail of a 503 for a connection over the cap (`busy`: all connections are answering requests)."""
    if busy:
        return (f"this worker holds more than {limit} open connections, all busy (LTSERVE_MAX_CONNECTIONS): retry "
                "shortly")
    return (f"this worker holds more than {limit} open connections (LTSERVE_MAX_CONNECTIONS) and this one had not "
            "sent its request: retry")


def receive_timeout_detail(seconds: float) -> str:
    return (f"the request was not received in full within {seconds:g} s (LTSERVE_RECEIVE_TIMEOUT_S); send it at "
            "once, or put a proxy that buffers uploads in front")


class Ledger:
    """Per uvicorn server (its ServerState): the connections owing a request, oldest first (a dict keeps insertion
    order), and those this module has closed that the event loop has not yet reported lost (uvicorn counts them
    open until then; without them a burst would push out far more connections than it needs to)."""

    def __init__(self) -> None:
        self.owing: dict[Any, None] = {}
        self.closing: set[Any] = set()


_LEDGERS: weakref.WeakKeyDictionary[Any, Ledger] = weakref.WeakKeyDictionary()


def ledger(server_state: Any) -> Ledger:
    ledger = _LEDGERS.get(server_state)
    if ledger is None:
        ledger = _LEDGERS[server_state] = Ledger()
    return ledger


def make_room(owing: dict[Any, None]) -> Any:
    """The connection to drop, among the `EVICTION_SCAN` oldest owing a request: the oldest of those with the least
    of a request waiting unread in the kernel (`_waiting_rank`); one with nothing waiting (idle, or what it sent has
    been read and is not a whole request) at once."""
    best, best_rank = next(iter(owing)), 4
    for i, conn in enumerate(owing):
        if i >= EVICTION_SCAN:
            break
        rank = waiting_rank(peek(conn.fd))
        if rank < best_rank:
            best, best_rank = conn, rank
            if rank == 0:
                break
    return best


def waiting_rank(waiting: bytes) -> int:
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


def peek(fd: int, size: int = 8192) -> bytes:
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


def raw_answer(status: int, error: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response with an ErrorBody that closes the connection, as bytes: written directly to the
    socket, because the protocol cannot answer a request whose headers it has not parsed."""
    body = error_json(error, detail)
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n")
    return head.encode("ascii") + body
