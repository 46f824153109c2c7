"""`ltserve COMMAND ...`: a thin dispatcher; each verb is the module of the same name in this package.

Commands are imported lazily, so `ltserve inspect` or `ltserve predict` never import torch. Every command module
exposes `cli(argv: list[str]) -> int` with its own argparse parser, and reads nothing from the environment except
what its stage documents (torchrun's RANK for `train`). Options shared by every command: `--no-progress` (no
progress bars), `--heads a,b` (comma lists of head names).
"""

from __future__ import annotations

import importlib
import logging
import sys

from ltserve import __version__
from ltserve.errors import LtserveError, unknown_choice

COMMANDS: dict[str, str] = {
    "train": "stage 1: joint training on a long-tailed data set -> runs/NAME",
    "rebalance": "stage 2: re-balance the classifier on cached features (crt, tau_norm, ...)",
    "evaluate": "report a run's heads (Many/Medium/Few/All), or a model package on a data set",
    "export": "fold a head and export a verified model package (model.onnx + model.json)",
    "inspect": "show a model package and verify every file's sha256",
    "predict": "offline batch prediction over folders, globs or list files",
    "bento": "build a Bento (BentoML) that serves one model package, pinned dependencies included",
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"ltserve {__version__}: long-tailed image classification, decoupled, folded and served", "",
             "usage: ltserve COMMAND [ARGS...]   (ltserve COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ltserve` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: {unknown_choice('command', command, list(COMMANDS))}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"{__name__}.{command}")
        return int(module.cli(rest) or 0)
    except LtserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
