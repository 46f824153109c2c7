"""`ltserve COMMAND ...`: a thin dispatcher; each verb is the module of the same name in this package.

Commands are imported lazily, so `ltserve inspect` or `ltserve predict` never import torch. Every command module
exposes `cli(argv: list[str]) -> int` with its own argparse parser, and reads nothing from the environment except
what its stage documents (torchrun's RANK for `train`).

One vocabulary for every verb (docs/recipes.md, "Command line"):

- what a verb acts on is its first positional argument: the recipe (`train CONFIG`), the run (`rebalance RUN`,
  `export RUN`, `evaluate RUN`) or the model package (`evaluate MODEL_DIR`, `inspect MODEL_DIR`, `predict MODEL_DIR
  INPUT...`, `bento MODEL_DIR`, `serve MODEL_DIR`). `predict --model DIR` is the older spelling, still accepted.
- `--out PATH` is what the verb makes (a run, a package, the prediction rows); `--json [PATH]` is its
  machine-readable report, to PATH or (`-`, or no PATH) to stdout in place of the summary.
- shared options: `--no-progress` (no progress bars), `--heads a,b` (comma lists of head names), `--set
  section.field=value` (config overrides).
- a renamed option keeps its old name for one release, hidden from --help; using it prints one line on stderr naming
  the new spelling (`ltserve.cli.common.add_alias`). Renamed so far: `predict --model` (now the first positional),
  `predict --summary-json` and `evaluate MODEL_DIR --out` (now `--json`), `predict --format` (now `--out-format`).
- exit statuses (`ltserve.cli.common`): 0 done; 1 the command ran and part of it failed (predict: unreadable
  files); 2 it could not start (bad arguments, a bad file or artefact, a missing extra: "error: ..." names the fix);
  3 a quality gate refused the result (int8 or JPEG-draft verification); 130 interrupted.
"""

from __future__ import annotations

import importlib
import logging
import sys

from ltserve import __version__
from ltserve.cli.common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, EXIT_USAGE, missing_extra,
                                missing_extra_message)
from ltserve.errors import LtserveError, QualityGateRefused, unknown_choice

COMMANDS: dict[str, str] = {
    "train": "stage 1: joint training on a long-tailed data set -> runs/NAME",
    "rebalance": "stage 2: re-balance the classifier on cached features (crt, tau_norm, ...)",
    "evaluate": "report a run's heads (Many/Medium/Few/All), or a model package on a data set",
    "export": "fold a head and export a verified model package (model.onnx + model.json)",
    "inspect": "show a model package and verify every file's sha256",
    "predict": "offline batch prediction over folders, globs or list files",
    "serve": "serve one model package over HTTP (bentoml serve; every LTSERVE_* setting as a flag)",
    "bento": "build a Bento (BentoML) that serves one model package, pinned dependencies included",
    "data": "fetch Fashion-MNIST, or write sample images (data fetch | data samples)",
    "demo": "the whole path on the embedded default, timed: train, rebalance, export, serve (make demo)",
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"ltserve {__version__}: long-tailed image classification, decoupled, folded and served", "",
             "usage: ltserve COMMAND [ARGS...]   (ltserve COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "exit status: 0 done, 1 partly failed (e.g. unreadable inputs), 2 could not start (bad arguments, "
              "file or install), 3 a quality gate refused the result, 130 interrupted (docs/recipes.md)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ltserve` console script.

    Returns:
        the exit status (`ltserve.cli.common`): 0 done, 1 partly failed, 2 could not start (the message names the
        fix), 3 a quality gate refused, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return EXIT_OK
    if argv[0] == "--version":
        print(__version__)
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: {unknown_choice('command', command, list(COMMANDS))}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    try:
        module = importlib.import_module(f"{__name__}.{command}")
        return int(module.cli(rest) or 0)
    except QualityGateRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except LtserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # an install without the extra this verb needs (e.g. `.[cpu]` running `train`)
        found = missing_extra(exc)
        if found is None:
            raise
        print(f"error: {missing_extra_message(command, *found)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
