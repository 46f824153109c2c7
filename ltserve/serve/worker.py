"""The service's processes: how many workers, what each sets up before BentoML starts its HTTP server, and the
metrics directory they share.

`bentoml serve` runs a supervisor (circus) that imports the service, runs its `@bentoml.on_deployment` hooks, then
starts the workers (`bentoml_seam.WORKER_MODULE`), each of which imports the service module, builds a
`uvicorn.Config` and runs it. So:

- `worker_count` decides the `workers=` of `@bentoml.service` at import: 2 where the model runs on CPU and there are
  2 or more cores (a killed worker leaves the other answering while it restarts), 1 on a GPU (each worker would hold
  its own CUDA context and model copy) or on one core; `cpu_threads` splits the cores among them;
- `prepare_server` runs in the supervisor (the service's on-deployment hook) before the workers exist: it gives this
  server a metrics directory of its own and puts it in the environment the workers inherit, with MALLOC_ARENA_MAX=2
  unless it is set (glibc's malloc gives each thread that allocates, decode and inference threads and BentoML's
  thread pool, an arena of its own, up to 8 per core, and keeps what they free: a worker's memory ratchets up with
  load);
- `setup_worker` runs in each worker at import: the guarded HTTP protocol (`ltserve.serve.bentoml_seam`), an open-file
  limit that fits it, Prometheus pointed at the server's metrics directory, and a watch on the supervisor so that
  the worker exits when it dies (circus cannot stop its workers once it has been killed with SIGKILL).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from ltserve.serve.bentoml_seam import install_protocol
from ltserve.serve.connection import ConnectionLimits
from ltserve.serve.settings import ServiceSettings, env_name

logger = logging.getLogger(__name__)

FILES_BESIDES_CONNECTIONS = 256
"""Open files a worker needs besides its connections: the model, libraries, pipes, upload temp files, metrics."""

PARENT_POLL_S = 0.1
"""How often a worker checks that its supervisor is alive."""

EXIT_GRACE_S = 0.7
"""After its supervisor died, how long a worker's graceful shutdown may take before it exits anyway."""

SUPERVISOR_PID_ENV = "LTSERVE_SUPERVISOR_PID"
"""Environment variable in which `prepare_server` gives the workers the supervisor's pid: a worker that reaches
`setup_worker` after its supervisor died (killed while this worker was still importing) knows it is an orphan."""

OWNED_MARK = ".ltserve-temporary"
"""File in a metrics directory that `prepare_server` created: whoever outlives the server removes the directory."""


def worker_count(settings: ServiceSettings, cores: int | None = None) -> int:
    """Worker processes for this machine: `settings.workers` when set; else 1 when the model runs on a GPU (the
    ONNX Runtime provider chosen first is not the CPU, or the torch backend on a device other than the CPU) or the
    machine has one core, else 2.

    Why 2 on CPU: one worker's crash (or `kill -9`) then leaves the other answering while BentoML restarts it,
    where one worker left the service silent for 4-12 s. Measured on 2 cores (benchmarks/results/*/abuse/, the tiny
    default package, 2026-12-07): two workers with one inference thread each served 1.4-1.7x the requests of one
    with two at concurrency 16 and 1.3-1.5x at 1, at the cost of a second copy of the model (+95 MB of the tree).
    """
    if settings.workers is not None:
        return settings.workers
    cores = cores or os.cpu_count() or 1
    if settings.backend == "torch":
        on_gpu = settings.torch_device != "cpu"
    else:
        from ltserve.runtime.onnx_runner import resolve_providers

        on_gpu = resolve_providers(settings.providers)[0] != "CPUExecutionProvider"
    return 1 if on_gpu or cores < 2 else 2


def cpu_threads(settings: ServiceSettings, workers: int, cores: int | None = None) -> int:
    """Inference threads per worker: `settings.threads` when set, else the cores divided among the workers (two
    workers each using every core would oversubscribe them)."""
    return settings.threads or max(1, (cores or os.cpu_count() or 1) // workers)


# ---------------------------------------------------------------------------------------------------------------------
# The supervisor: a metrics directory per server
# ---------------------------------------------------------------------------------------------------------------------


def prepare_server(settings: ServiceSettings) -> Path:
    """In the supervisor, before the workers start: this server's Prometheus multiprocess directory, and
    MALLOC_ARENA_MAX=2 for the workers unless it is set (see the module docstring).

    `settings.metrics_dir` when set (emptied of the .db files of an earlier run), else a new private temporary
    directory, removed when the supervisor exits (or, if it is killed, by its last worker). Its path goes into the
    environment as LTSERVE_METRICS_DIR, which circus copies into every worker it starts (also the ones it
    restarts), where `setup_worker` points Prometheus at it.

    Returns:
        the directory.
    """
    if settings.metrics_dir is not None:
        path = settings.metrics_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="ltserve-metrics-"))
        (path / OWNED_MARK).touch()
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ[env_name("metrics_dir")] = str(path)
    os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # read by glibc when a worker starts
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Each worker
# ---------------------------------------------------------------------------------------------------------------------


def setup_worker(settings: ServiceSettings) -> None:
    """Prepare this worker process (called at the service's import, before BentoML starts uvicorn).

    Args:
        settings: the service settings (receive_timeout_s, max_connections, metrics_dir).
    """
    show_start_lines()
    install_protocol(ConnectionLimits(receive_timeout_s=settings.receive_timeout_s,
                                      max_connections=settings.max_connections))
    fit_open_files(settings.max_connections + FILES_BESIDES_CONNECTIONS)
    temporary = None
    if settings.metrics_dir is not None:
        # before any metric value exists: prometheus_client opens its files in the directory named here then
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.metrics_dir)
        if (settings.metrics_dir / OWNED_MARK).is_file():
            temporary = settings.metrics_dir
    watch_parent(on_orphan=(lambda: shutil.rmtree(temporary, ignore_errors=True)) if temporary else None)


def show_start_lines() -> None:
    """Let ltserve's INFO lines through in a worker: BentoML's server logging passes only WARNING and above from
    loggers other than its own (the root logger at WARNING), which hides what a worker says once at start (the
    package it serves, the live prior's estimator and why). Left alone when `bentoml serve --quiet` raised the root
    level, or when ltserve's level is set already. ltserve logs nothing at INFO per request."""
    package_logger = logging.getLogger("ltserve")
    if package_logger.level == logging.NOTSET and logging.getLogger().level <= logging.WARNING:
        package_logger.setLevel(logging.INFO)


def fit_open_files(needed: int) -> int:
    """Raise this process's soft open-file limit to `needed` when it is lower and the hard limit allows.

    Returns:
        the soft limit now in force (a warning names the fix when it is still below `needed`); -1 where the
        platform has no such limit (no `resource` module).
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning("open-file limit %d is below LTSERVE_MAX_CONNECTIONS + %d = %d: raise `ulimit -n` (hard limit "
                       "%s) or lower LTSERVE_MAX_CONNECTIONS", soft, FILES_BESIDES_CONNECTIONS, needed, hard)
    return soft


def watch_parent(poll_s: float = PARENT_POLL_S, grace_s: float = EXIT_GRACE_S,
                 on_orphan: Callable[[], None] | None = None) -> threading.Thread:
    """Exit this process when its supervisor dies: a daemon thread checks every `poll_s` seconds that the parent
    is the one at start (`os.getppid()`) and, where `prepare_server` named the supervisor (SUPERVISOR_PID_ENV), that
    this pid still exists; on a change it calls `on_orphan`, sends this process SIGTERM (uvicorn's graceful
    shutdown) and exits with status 1 `grace_s` seconds later if that has not finished.

    The named pid matters when the supervisor is killed while this worker is still importing: the parent at start
    is then already init (or a subreaper), and a watch on `os.getppid()` alone would never fire.

    Returns:
        the watching thread (started).
    """
    parent = os.getppid()
    named = os.environ.get(SUPERVISOR_PID_ENV, "")
    supervisor = int(named) if named.isdigit() else parent

    def orphaned() -> bool:
        return os.getppid() != parent or (supervisor != parent and not pid_exists(supervisor))

    def watch() -> None:
        while not orphaned():
            time.sleep(poll_s)
        logger.error("the server's supervisor (pid %d) is gone: worker %d exits", supervisor, os.getpid())
        if on_orphan is not None:
            on_orphan()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="ltserve-parent-watch", daemon=True)
    thread.start()
    return thread


def pid_exists(pid: int) -> bool:
    """Whether a process (not a zombie left for its parent to reap) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (not Linux), or gone meanwhile
        return True
