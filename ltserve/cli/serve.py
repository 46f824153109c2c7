"""`ltserve serve MODEL_DIR [--port 3000] [--host ADDR] [--SETTING VALUE ...]`: serve one model package over HTTP.

Runs `bentoml serve ltserve.service:Classifier` in place of this process (exec: Ctrl-C, SIGTERM and the exit status
are the server's own) with LTSERVE_MODEL set to MODEL_DIR. Every service setting (`ltserve.serve.settings.
ServiceSettings`, one source of truth) is a flag named after its field, taking the same text as its LTSERVE_*
variable: `--top-k 3` is `LTSERVE_TOP_K=3`, `--torch-cuda-graphs 0` is `LTSERVE_TORCH_CUDA_GRAPHS=0`. A flag wins over
the variable, which wins over the `--config` / LTSERVE_CONFIG file. The settings are checked here, before the server
starts, so a bad value fails at once with the setting's name.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from ltserve.errors import ConfigError, PackageError
from ltserve.package import MODEL_JSON, read_model_json
from ltserve.serve.process import SERVICE, bentoml_executable
from ltserve.serve.settings import ServiceSettings, env_name

DEFAULT_PORT = 3000
POSITIONAL = "model"
"""The setting given as MODEL_DIR rather than as a flag."""


def setting_flag(field: str) -> str:
    """The flag of a settings field: "top_k" -> "--top-k"."""
    return "--" + field.replace("_", "-")


def settings_help() -> dict[str, str]:
    """Each settings field's description, from the Attributes section of `ServiceSettings`' docstring (so the flags'
    help and the class's documentation cannot differ)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in (ServiceSettings.__doc__ or "").splitlines():
        entry = re.match(r"^ {8}(\w+): (.*)$", line)
        if entry and entry.group(1) in ServiceSettings.model_fields:
            current = entry.group(1)
            out[current] = [entry.group(2)]
        elif current and re.match(r"^ {12}\S", line):
            out[current].append(line.strip())
        else:
            current = None
    return {k: " ".join(v) for k, v in out.items()}


def build_parser() -> argparse.ArgumentParser:
    """The parser: MODEL_DIR, --port, --host, then one flag per service setting."""
    p = argparse.ArgumentParser(prog="ltserve serve", description=__doc__.split("\n\n")[1])
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="model package folder (models/NAME, from "
                   "`ltserve export`); sets LTSERVE_MODEL")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--host", default=None, help="address to listen on (default: bentoml serve's, every interface; "
                   "127.0.0.1 for this machine only)")
    p.add_argument("--dry-run", action="store_true", help="check the package and settings, print the command and "
                   "the LTSERVE_* variables it would run with, and exit")
    g = p.add_argument_group("service settings", "each takes the text of its LTSERVE_* variable and wins over it "
                             "(docs/serving.md, ## Settings)")
    docs = settings_help()
    for field in ServiceSettings.model_fields:
        if field == POSITIONAL:
            continue
        text = docs.get(field, "").replace("%", "%%")
        if field == "api_key":
            text += " Prefer the variable: a flag's value is visible to other users in the process list."
        g.add_argument(setting_flag(field), dest=f"setting_{field}", metavar="VALUE", help=text)
    return p


def server_environment(args: argparse.Namespace) -> dict[str, str]:
    """The LTSERVE_* variables the flags set (LTSERVE_MODEL included), checked together with this environment's.

    Raises:
        PackageError: MODEL_DIR is not a model package.
        ConfigError: a setting is invalid (names the flag, the variable and the problem).
    """
    model = args.model_dir.expanduser().resolve()
    if not (model / MODEL_JSON).is_file():
        raise PackageError(f"{args.model_dir}: not a model package (no {MODEL_JSON}); pass the folder `ltserve "
                           "export RUN --head HEAD --out models/NAME` wrote, e.g. models/fashion-lt")
    read_model_json(model)  # a clear error for an invalid model.json now; the service verifies every sha256
    given = {f: getattr(args, f"setting_{f}") for f in ServiceSettings.model_fields if f != POSITIONAL}
    given = {f: v for f, v in given.items() if v is not None}
    try:
        ServiceSettings.from_env(model=model, **given)
    except ConfigError as exc:
        flags = ", ".join(f"{setting_flag(f)} is {env_name(f)}" for f in given)
        raise ConfigError(f"ltserve serve: {exc}" + (f"\n({flags}; [argument] marks a flag)" if flags else "")) \
            from None
    return {env_name(POSITIONAL): str(model), **{env_name(f): str(v) for f, v in given.items()}}


def cli(argv: list[str] | None = None) -> int:
    """Check the package and the settings, then exec `bentoml serve` (does not return unless --dry-run)."""
    args = build_parser().parse_args(list(argv or []))
    env = server_environment(args)
    cmd = [bentoml_executable(), "serve", SERVICE, "--port", str(args.port),
           *(["--host", args.host] if args.host else [])]
    shown = {k: ("***" if k == env_name("api_key") else v) for k, v in env.items()}
    line = " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()) + " " + shlex.join(cmd)
    if args.dry_run:
        print(line)
        return 0
    print(f"ltserve serve: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # exec, not a child: signals reach the server directly and its exit status is this command's
    os.execvpe(cmd[0], cmd, {**os.environ, **env})
    return 1  # not reached
