"""`ltserve COMMAND ...`: a thin dispatcher; each command lives in the module of its stage.

Commands are imported lazily, so `ltserve inspect` or `ltserve predict` never import torch.
Every command module exposes `cli(argv: list[str]) -> int` with its own argparse parser.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from ltserve import __version__
from ltserve.errors import LtserveError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ltserve.train", "stage 1: joint training on a long-tailed data set -> runs/NAME"),
    "rebalance": ("ltserve.rebalance", "stage 2: re-balance the classifier on cached features (crt, tau_norm, ...)"),
    "evaluate": ("ltserve.evaluate", "report a run's heads (Many/Medium/Few/All), or a model package on a data set"),
    "export": ("ltserve.export", "fold a head and export a verified model package (model.onnx + model.json)"),
    "inspect": ("ltserve.inspect_package", "show a model package and verify every file's sha256"),
    "predict": ("ltserve.batch", "offline batch prediction over folders, globs or list files"),
}

# `ltserve evaluate models/NAME --data ...` runs a package through ONNX Runtime: no torch needed.
PACKAGE_EVALUATE = "ltserve.package_eval"


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"ltserve {__version__}: long-tailed image classification, decoupled, folded and served", "",
             "usage: ltserve COMMAND [ARGS...]   (ltserve COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _module_for(command: str, rest: list[str]) -> str:
    module = COMMANDS[command][0]
    if command == "evaluate" and rest and not rest[0].startswith("-") and (Path(rest[0]) / "model.json").is_file():
        module = PACKAGE_EVALUATE
    return module


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
        from ltserve.config import unknown_choice

        print(f"error: {unknown_choice('command', command, list(COMMANDS))}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(_module_for(command, rest))
        return int(module.cli(rest) or 0)
    except LtserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
