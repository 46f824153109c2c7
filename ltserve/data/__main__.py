"""`ltserve data fetch [--dest DIR]` (or `python -m ltserve.data fetch`, what `make data` runs) and `ltserve data
samples OUT_DIR --count N`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ltserve.data.fashion_mnist import (OFFICIAL_URL, download_fashion_mnist, find_fashion_mnist, user_cache_dir,
                                        write_samples)
from ltserve.errors import DataError

def cli(argv: list[str] | None = None, prog: str = "python -m ltserve.data") -> int:
    """`fetch`: make sure Fashion-MNIST is present (find it, else download it) and print its folder.
    `samples OUT_DIR --count N`: write N Fashion-MNIST images as PNG files plus OUT_DIR/labels.txt."""
    parser = argparse.ArgumentParser(prog=prog, description=cli.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="find Fashion-MNIST, else download it; print its folder")
    fetch.add_argument("--dest", help="folder to use (default: search, then download to the user cache "
                                      f"{user_cache_dir()})")
    fetch.add_argument("--base-url", default=OFFICIAL_URL, help="download location (default: the official one)")
    samples = sub.add_parser("samples", help="write N Fashion-MNIST images as <split>_<index>.png plus "
                                             "OUT_DIR/labels.txt ('name label' lines)")
    samples.add_argument("out_dir", help="folder to write, e.g. samples")
    samples.add_argument("--count", type=int, default=8, help="number of images (the first N of the split; "
                                                               "default 8)")
    samples.add_argument("--split", choices=("test", "train"), default="test", help="official split (default test)")
    samples.add_argument("--root", help="Fashion-MNIST folder (default: searched)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "samples":
        listing = write_samples(args.out_dir, args.count, args.split, args.root)
        print(f"{args.count} images and {listing} written")
        return 0
    try:
        folder = find_fashion_mnist(args.dest)
    except DataError:
        folder = download_fashion_mnist(Path(args.dest) if args.dest else user_cache_dir(), args.base_url)
    print(folder)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(cli())
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
