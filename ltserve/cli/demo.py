"""`ltserve demo [--fresh] [--no-serve] ...`: the same program as `python -m ltserve.demo` (ltserve/demo.py), which
`make demo` and `make default-model` run: train, rebalance, evaluate and export on the embedded default, then serve
the package and answer one real request. Needs the training extra."""

from __future__ import annotations


def cli(argv: list[str] | None = None) -> int:
    """Run the demo; see `ltserve demo --help`."""
    from ltserve.demo import main  # the demo is a program on top, as this dispatcher (tests/test_layout.py)

    return main(list(argv or []), prog="ltserve demo")
