"""What a `bentoml serve` worker process of the service sets up before BentoML starts its HTTP server.

BentoML's worker (`_bentoml_impl.worker.service`) imports the service module, then builds a `uvicorn.Config` and
runs it; the service calls `setup_worker` at import, inside workers only, so everything here is in place before the
first connection:

- the HTTP protocol with a receive deadline, a connection cap and the unknown-path gate (`ltserve.serve.connection`);
- an open-file limit that fits `max_connections` (the soft limit is raised toward the hard one when it does not).
"""

from __future__ import annotations

import logging

from ltserve.serve.connection import ConnectionLimits, install
from ltserve.serve.settings import ServiceSettings

logger = logging.getLogger(__name__)

FILES_BESIDES_CONNECTIONS = 256
"""Open files a worker needs besides its connections: the model, libraries, pipes, upload temp files, metrics."""


def setup_worker(settings: ServiceSettings) -> None:
    """Prepare this worker process: the guarded HTTP protocol and its open-file limit.

    Args:
        settings: the service settings (receive_timeout_s, max_connections).
    """
    install(ConnectionLimits(receive_timeout_s=settings.receive_timeout_s, max_connections=settings.max_connections))
    fit_open_files(settings.max_connections + FILES_BESIDES_CONNECTIONS)


def fit_open_files(needed: int) -> int:
    """Raise this process's soft open-file limit to `needed` when it is lower and the hard limit allows.

    Returns:
        the soft limit now in force (a warning names the fix when it is still below `needed`).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning("open-file limit %d is below LTSERVE_MAX_CONNECTIONS + %d = %d: raise `ulimit -n` (hard limit "
                       "%s) or lower LTSERVE_MAX_CONNECTIONS", soft, FILES_BESIDES_CONNECTIONS, needed, hard)
    return soft
