"""What every `ltserve` verb shares: the exit statuses, the `--json` report option, deprecated option names, and
the extra a verb needs when a module is missing.

Exit statuses (one meaning each, in every verb):

    EXIT_OK          0    done
    EXIT_FAILED      1    the command ran and part of its work failed (predict: files that could not be read;
                          serve: the server stopped with an error)
    EXIT_USAGE       2    the command could not start: bad arguments (argparse's own status), a bad file, config or
                          artefact (`LtserveError`, printed as "error: ..."), or an extra that is not installed
    EXIT_REFUSED     3    a quality gate refused the result (`QualityGateRefused`: int8 or JPEG-draft verification of
                          `ltserve export`); the inputs were fine, the result was not good enough, nothing was written
    EXIT_INTERRUPTED 130  Ctrl-C or SIGTERM (the shell's status for SIGINT)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130

STDOUT = "-"
"""`--json -` (or a bare `--json`): the report goes to stdout in place of the human-readable summary."""

EXTRA_OF_MODULE: dict[str, str] = {
    **{m: "train" for m in ("torch", "torchvision", "timm", "huggingface_hub", "onnx", "onnxscript",
                            "onnxconverter_common", "safetensors", "matplotlib")},
    "onnxruntime": "cpu",
    "ray": "ray",
    "pyarrow": "ray",
    "s3fs": "s3",
}
"""Top-level module -> the ltserve extra that installs it (pyproject.toml's optional-dependencies)."""


def missing_extra(exc: ImportError) -> tuple[str, str] | None:
    """(module, extra) when `exc` is a missing module that an ltserve extra installs, else None (a real bug)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    return (name, EXTRA_OF_MODULE[name]) if name in EXTRA_OF_MODULE else None


def missing_extra_message(command: str, module: str, extra: str) -> str:
    """What `ltserve COMMAND` prints when `module` is not installed: the extra and the pip line that installs it."""
    what = {"train": "the training extra", "cpu": "an ONNX Runtime extra (cpu, or gpu)"}.get(extra, f"the {extra} "
                                                                                                      "extra")
    return (f"ltserve {command} needs {what}: pip install \"ltserve[{extra}]\" (in a clone: pip install -e "
            f"\".[{extra}]\"); module {module!r} is not installed")


# ---------------------------------------------------------------------------------------------------------------------
# --json
# ---------------------------------------------------------------------------------------------------------------------


def add_json_option(parser: argparse.ArgumentParser | Any, what: str) -> argparse.Action:
    """Add `--json [PATH]`: write the verb's machine-readable report (`what`) to PATH, or to stdout with `-` or no
    PATH (then in place of the human-readable output).

    Returns:
        the action, for `add_alias` (an older name of the option).
    """
    return parser.add_argument("--json", nargs="?", const=STDOUT, default=None, metavar="PATH",
                               help=f"write {what} as JSON to PATH; '-' or no PATH: print it to stdout instead of "
                                    "the summary")


def emit_json(dest: str | Path | None, report: Any) -> bool:
    """Write `report` where `--json` says.

    Returns:
        True when it went to stdout (the caller prints no human-readable summary then).
    """
    from ltserve.fileio import json_text, write_json

    if dest is None:
        return False
    if str(dest) == STDOUT:
        print(json_text(report))
        return True
    write_json(dest, report)
    print(f"JSON report written to {dest}")
    return False


def wants_stdout_json(dest: str | Path | None) -> bool:
    """`--json -`: the JSON goes to stdout, so the human-readable lines go to stderr or nowhere."""
    return dest is not None and str(dest) == STDOUT


# ---------------------------------------------------------------------------------------------------------------------
# Deprecated option names
# ---------------------------------------------------------------------------------------------------------------------


class _DeprecatedAlias(argparse.Action):
    """An older option name: stores into the new option's destination and says once, on stderr, what to use."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated and will be removed in the next release; use "
              f"{self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_alias(parser: argparse.ArgumentParser | Any, old: str, new: argparse.Action, new_name: str | None = None,
              dest: str | None = None) -> argparse.Action:
    """Accept `old` as a deprecated name of the option `new` (same value, hidden from --help; a one-line notice on
    stderr naming the new spelling when used).

    Args:
        old: the old option string, e.g. "--summary-json".
        new: the action of the new option (what `add_argument` returned).
        new_name: how the notice names the new spelling (default: the new option's first option string).
        dest: where the value goes (default: the new option's destination).
    """
    flag = new.nargs == 0
    return parser.add_argument(
        old, dest=dest or new.dest, action=_DeprecatedAlias, new=new_name or new.option_strings[0],
        nargs=0 if flag else new.nargs, const=new.const if flag or new.nargs == "?" else None,
        default=argparse.SUPPRESS, **({} if flag else {"type": new.type, "choices": new.choices}),
        help=argparse.SUPPRESS)
