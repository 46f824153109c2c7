"""`bentoml serve` as a child process on 127.0.0.1: what `make demo`, the benchmarks and the tests start.

The server runs in its own process group, writes its output to a log file, and is stopped by its pid: SIGTERM to the
group (BentoML's supervisor then stops its workers, which circus puts in process groups of their own), SIGKILL if it
has not stopped in time (the workers then exit by themselves: `ltserve.serve.worker.watch_parent`). No torch here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from ltserve.serve.bentoml_seam import WORKER_MODULE

SERVICE = "ltserve.service:Classifier"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bentoml_executable() -> str:
    """The `bentoml` script of the running interpreter's environment (falls back to PATH)."""
    return shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"


class ServerProcess:
    """One `bentoml serve` of ltserve's service.

    Args:
        env: variables added to this process's environment (LTSERVE_MODEL, LTSERVE_* settings, ...).
        log: file that receives the server's stdout and stderr; None lets it print to this process's terminal.
        port: TCP port on 127.0.0.1; None picks a free one.
        target: the BentoML service (`module:Class`); the installed ltserve service by default, so any working
            directory works; None serves what `bentofile.yaml` in `cwd` names (plain `bentoml serve`).
        cwd: working directory of the server (relative LTSERVE_MODEL paths resolve from it).
        inherit_env: add `env` to this process's environment (default), or use `env` alone.
    """

    def __init__(self, env: dict[str, str] | None = None, log: Path | None = None, port: int | None = None,
                 target: str | None = SERVICE, cwd: Path | None = None, inherit_env: bool = True) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else None
        self._log_file: IO[bytes] | None = open(self.log, "wb") if self.log else None
        self.proc = subprocess.Popen(
            [bentoml_executable(), "serve", *([target] if target else []), "--host", "127.0.0.1", "--port",
             str(self.port)],
            cwd=cwd, env={**(os.environ if inherit_env else {}), **(env or {})}, stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file else None, start_new_session=True)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log ('' when it prints to the terminal)."""
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.is_file() else ""

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /readyz until it answers 200 (warm-up done).

        Raises:
            RuntimeError: the server exited, or was not ready within `timeout` seconds (with the log's end).
        """
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"bentoml serve not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def workers(self) -> list:
        """The server's live worker processes (psutil.Process of BentoML's worker module, `WORKER_MODULE`, found
        from the supervisor; zombies the supervisor has not reaped yet are left out)."""
        import psutil  # a BentoML dependency; only callers that inspect workers need it

        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and WORKER_MODULE in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # gone meanwhile
                pass
        return found

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it has not stopped within `timeout` seconds."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
