"""Serving a model package over HTTP: ltserve's service (`ltserve.service:Classifier`) runs on these parts.

    settings.py      ServiceSettings: the service's one settings object (LTSERVE_* variables, LTSERVE_CONFIG file)
    http.py          ltserve's own routes as one plain ASGI app in front of BentoML's (the hot path)
    uploads.py multipart.py   the classify routes' uploads, parsed once
    batcher.py       AsyncPredictor: adaptive batching across concurrent requests
    live_prior.py prior_files.py   the live class prior of the traffic, shared by the workers through files
    v2.py openapi.py openapi_v2.py docs_page.py   the Open Inference Protocol, the OpenAPI contract, the API page
    connection.py    per-worker connection policy (request deadline, open-connection cap)
    metrics.py       the service's Prometheus metrics
    worker.py        how many workers, what each sets up, the shared metrics directory
    bentoml_seam.py  the one module that touches BentoML's and uvicorn's internals (version-checked)
    process.py       ServerProcess: `bentoml serve` as a child process on 127.0.0.1 (demo, benchmarks, tests)

The names below are the interface other packages use; they are imported on first use, so `import ltserve.serve.x`
(every worker imports several) costs no more than module x itself, and nothing here imports BentoML or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ltserve.serve.batcher import AsyncPredictor
    from ltserve.serve.process import SERVICE, ServerProcess, free_port
    from ltserve.serve.settings import ServiceSettings

_HOME = {"AsyncPredictor": "ltserve.serve.batcher", "SERVICE": "ltserve.serve.process",
         "ServerProcess": "ltserve.serve.process", "free_port": "ltserve.serve.process",
         "ServiceSettings": "ltserve.serve.settings"}
"""Public name -> the module that defines it."""

__all__ = ["SERVICE", "AsyncPredictor", "ServerProcess", "ServiceSettings", "free_port"]


def __getattr__(name: str) -> Any:
    # PEP 562: `from ltserve.serve import ServerProcess` imports process.py then, not when the package is imported
    if name not in _HOME:
        raise AttributeError(f"module 'ltserve.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
