"""The one seam to BentoML's and uvicorn's internals: everything in `ltserve/` that depends on more than their public
API is here, checked against the versions it was tested with.

What is reached, and why:

1. `Service.to_asgi` (BentoML `_bentoml_sdk`): `front_service(service, wrap)` makes the app BentoML builds for the
   service, in its workers and in `to_asgi()` alike, `wrap(app)`: ltserve's `Front` (`ltserve.serve.http`), which
   answers ltserve's own routes and hands every other request to BentoML's app. BentoML's app wraps each route,
   mounted ASGI apps too, in its middlewares (OpenTelemetry, traffic metrics, access log, timeout, context: about
   0.8 ms of CPU per request measured on the 2-core box), and its typed `@bentoml.api` layer parses the body
   again into arguments (1.4-1.8 ms more); BentoML has no public hook in front of them. The service object is an
   attrs slots instance, so its class is swapped for a subclass whose only change is `to_asgi`.
2. uvicorn's HTTP protocol (`uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`, the C parser): BentoML's
   worker builds `uvicorn.Config` with the default `http="auto"`, which uvicorn resolves through
   `uvicorn.config.HTTP_PROTOCOLS`; `install_protocol` points that entry at `GuardedProtocol`, which enforces
   `ltserve.serve.connection`'s receive deadline and connection cap (uvicorn has neither: its issue #157) and
   answers 503 over the cap before the app runs.

3. `bento_env` builds BentoML's schema object for a Bento's environment variables (`ltserve bento`).

`check_versions()` fails at the service's import with the fix when BentoML or uvicorn is outside the tested range.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from typing import Any, Callable

from ltserve.serve.connection import (OPEN_PATHS, TOO_MANY_CONNECTIONS, ConnectionLimits, ledger, make_room,
                                      over_cap_detail, raw_answer, receive_timeout_detail)
from ltserve.serve.http import error_answer, send_answer

TESTED = {"bentoml": ((1, 4, 30), (1, 5)), "uvicorn": ((0, 30), (0, 55)), "httptools": ((0, 6), (1, 0))}
"""Package -> [lowest, first untested) versions this seam was tested with (constraints.txt pins the tested ones)."""

WORKER_MODULE = "_bentoml_impl.worker.service"
"""The module BentoML's supervisor runs each worker as (how a worker process is recognised by its command line)."""


def _parse(v: str) -> tuple[int, ...]:
    out = []
    for piece in v.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_versions() -> None:
    """Raise RuntimeError naming the package, its version, the tested range and the fix, when one of `TESTED` is
    outside its range."""
    for package, (low, high) in TESTED.items():
        found = version(package)
        if not low <= _parse(found) < high:
            raise RuntimeError(
                f"ltserve's serving layer was tested with {package} >= {'.'.join(map(str, low))}, < "
                f"{'.'.join(map(str, high))}, and {package} {found} is installed; it reaches {package}'s internals "
                "(ltserve/serve/bentoml_seam.py). Install the tested versions: pip install -c constraints.txt "
                "'ltserve[cpu]' (or pin the package)")


def front_service(service: Any, wrap: Callable[[Any], Any]) -> None:
    """Make every ASGI app BentoML builds for `service` (its workers' and `to_asgi()`'s) `wrap(app)`."""
    base = type(service)
    if getattr(base, "_ltserve_fronted", False):
        base = base.__mro__[1]

    def to_asgi(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrap(base.to_asgi(self, *args, **kwargs))

    fronted = type(f"Fronted{base.__name__}", (base,), {"__slots__": (), "to_asgi": to_asgi,
                                                          "_ltserve_fronted": True})
    service.__class__ = fronted


def bento_env(name: str, value: str) -> Any:
    """One environment variable of a Bento, as `bentoml.bentos.build(envs=...)` takes it (BentoML's build schema
    type, which its public API does not export)."""
    from bentoml._internal.bento.build_config import BentoEnvSchema

    return BentoEnvSchema(name=name, value=value)


def install_protocol(limits: ConnectionLimits) -> None:
    """Make `GuardedProtocol`, with `limits`, the HTTP protocol of uvicorn servers started in this process with the
    default `http="auto"`."""
    import uvicorn.config

    GuardedProtocol.limits = limits
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedProtocol"


def _protocol_base() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return HttpToolsProtocol


class GuardedProtocol(_protocol_base()):  # type: ignore[misc]
    """uvicorn's httptools protocol with `ltserve.serve.connection`'s receive deadline and connection cap. One
    instance per connection, as uvicorn makes them."""

    limits: ConnectionLimits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app_behind_gate = self.app
        self.app = self._gate  # uvicorn runs `self.app` for each request of this connection
        self._deadline: asyncio.TimerHandle | None = None
        self._got_bytes = False  # since the connection became ready for its current request
        self._unanswered = 0  # requests received in full and not answered yet (pipelining)
        self.fd = -1

    # -- asyncio.Protocol and httptools callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        book = ledger(self.server_state)
        excess = len(self.connections) - len(book.closing) - self.limits.max_connections
        while excess > 0 and book.owing:
            make_room(book.owing)._drop(503, TOO_MANY_CONNECTIONS,
                                        over_cap_detail(self.limits.max_connections, busy=False))
            excess -= 1
        self._owe_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._paid()
        ledger(self.server_state).closing.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)

    def on_message_complete(self) -> None:
        answered = self.cycle is not None and self.cycle.response_complete  # e.g. a 413 sent before the body ended
        super().on_message_complete()
        self._paid()
        if answered:  # ready for the next request already
            self._got_bytes = False
            self._owe_request()
        else:
            self._unanswered += 1

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._unanswered = max(0, self._unanswered - 1)
        if not self.transport.is_closing() and self._unanswered == 0 and self._deadline is None:
            self._got_bytes = False
            self._owe_request()

    # -- the receive deadline -----------------------------------------------------------------------------------------

    def _owe_request(self) -> None:
        self._deadline = self.loop.call_later(self.limits.receive_timeout_s, self._on_deadline)
        ledger(self.server_state).owing[self] = None

    def _paid(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        ledger(self.server_state).owing.pop(self, None)

    def _on_deadline(self) -> None:
        self._deadline = None
        self._drop(408, "request_timeout", receive_timeout_detail(self.limits.receive_timeout_s))

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
            self.transport.write(raw_answer(status, error, detail))
        self.transport.close()
        ledger(self.server_state).closing.add(self)

    # -- the gate: over the connection cap ----------------------------------------------------------------------------

    async def _gate(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["path"] not in OPEN_PATHS
                and len(self.connections) > self.limits.max_connections):
            answer = error_answer(503, TOO_MANY_CONNECTIONS, over_cap_detail(self.limits.max_connections, busy=True),
                                  {"Connection": "close", "Retry-After": "1"})
            return await send_answer(send, answer)
        await self._app_behind_gate(scope, receive, send)
