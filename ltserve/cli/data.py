"""`ltserve data fetch [--dest DIR]` and `ltserve data samples OUT_DIR --count N`: the same commands as
`python -m ltserve.data` (ltserve/data/__main__.py), which `make data` runs."""

from __future__ import annotations

from ltserve.data.__main__ import cli as data_cli


def cli(argv: list[str] | None = None) -> int:
    """Fetch Fashion-MNIST (find it, else download it) or write sample images; see `ltserve data --help`."""
    return data_cli(list(argv or []), prog="ltserve data")
