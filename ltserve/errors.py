"""The errors ltserve raises on purpose, and the one way of naming a value outside its choices.

Every message says where (file, line or field), what is wrong, and how to fix it. The service maps
`InvalidInput` subclasses to HTTP 4xx; the CLI prints any `LtserveError` without a traceback.
"""

from __future__ import annotations

import difflib
from typing import Sequence


def unknown_choice(field: str, value: str, choices: Sequence[str]) -> str:
    """Message for a value outside its choices, with the closest valid one suggested.

    Example: unknown_choice("--heads", "taunorm", ["crt", "tau_norm"]) ->
    "--heads 'taunorm' is not one of crt, tau_norm; did you mean 'tau_norm'?"
    """
    msg = f"{field} {value!r} is not one of {', '.join(choices)}"
    close = difflib.get_close_matches(value, list(choices), n=1)
    return msg + (f"; did you mean {close[0]!r}?" if close else "")


class LtserveError(Exception):
    """Base of every error ltserve raises for a user mistake or a bad artefact."""


class ConfigError(LtserveError, ValueError):
    """A config file, a `--set` override or a CLI argument is invalid."""


class DataError(LtserveError, ValueError):
    """A data set file is missing, unreadable or malformed (the message names the file and line)."""


class RunError(LtserveError):
    """A run directory (the decoupled checkpoint) is missing a file or is inconsistent."""


class PackageError(LtserveError):
    """A model package (model.onnx + model.json) is missing, invalid, or fails its sha256 check."""


class QualityGateRefused(PackageError):
    """A verification gate refused an export's result (int8 or JPEG-draft accuracy per shot group): the inputs were
    valid, the result was not good enough, and nothing was written. `ltserve` exits with status 3 on it."""


class InvalidInput(LtserveError, ValueError):
    """A request or file given to the Predictor cannot be used; the service answers 4xx."""

    status_code = 400


class InvalidImage(InvalidInput):
    """The bytes are not a decodable image of a supported format."""

    status_code = 400


class ImageTooLarge(InvalidInput):
    """The image has more pixels than allowed (decompression-bomb guard)."""

    status_code = 413


class UnsupportedFormat(InvalidImage):
    """The bytes are an image format ltserve does not accept."""

    status_code = 415


class MissingDependency(LtserveError, ImportError):
    """A package the requested feature needs is not installed (the message names the extra to install)."""
