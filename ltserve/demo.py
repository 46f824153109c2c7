"""`make demo`: the whole path on the embedded default, timed.

train (configs/fashion_lt.yaml) -> rebalance (every head) -> heads table -> export the best head by val accuracy
-> `bentoml serve` on it, checked with one real request, and a `curl` example printed.

An existing run folder is resumed: stage 1 continues from its last checkpoint (an interrupted demo loses at most an
epoch), or has nothing left to train when finished; stage 2, the evaluation and the export run again. `--fresh`
deletes the run first and trains from scratch. `make default-model` runs the same with `--no-serve --fresh` into
models/fashion-lt (the committed default model).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "fashion_lt.yaml"
log = logging.getLogger("ltserve.demo")


def _stage(name: str, timings: dict[str, float], fn, *args, **kwargs):
    print(f"\n=== {name} ===", flush=True)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = time.perf_counter() - t0
    print(f"--- {name}: {timings[name]:.1f} s", flush=True)
    return out


def build(config: Path, run_dir: Path, model_dir: Path, fresh: bool, overrides: list[str],
          command: str = "make demo") -> dict[str, float]:
    """Train (or resume), rebalance, evaluate and export; returns the wall time of each stage in seconds.

    Args:
        config, overrides: the recipe and its `--set` overrides.
        run_dir: the run folder; an existing run there is resumed unless `fresh`.
        model_dir: the package folder (replaced).
        fresh: delete `run_dir` first and train from scratch.
        command: what the package's provenance records as the command that made it.

    Raises:
        RunError: the existing run was trained with a different recipe (the message says to use --fresh).
    """
    from ltserve.config import load_config
    from ltserve.evaluate import best_head, evaluate_run, heads_table
    from ltserve.export import export_package
    from ltserve.rebalance import rebalance
    from ltserve.errors import RunError
    from ltserve.rundir import RunPaths, open_run
    from ltserve.train import train

    timings: dict[str, float] = {}
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(config, overrides)
    paths = RunPaths(run_dir)
    if paths.run_json.is_file() or any(paths.checkpoint.glob("epoch-*.json")):
        print(f"resuming the run in {run_dir} (--fresh starts it over)", flush=True)
    try:
        # resume=True also starts from scratch when there is no run yet
        _stage("stage 1: joint training", timings, train, cfg, run_dir, resume=True)
    except RunError as exc:
        raise RunError(f"{exc}; or start the demo over with --fresh (deletes {run_dir})") from None
    run = open_run(run_dir)
    _stage("stage 2: rebalance", timings, rebalance, run)
    results = _stage("evaluate every head (test split)", timings, evaluate_run, run, "test")
    print(f"\n{run_dir}: every head on the {results['split']} split ({results['n']} images), top-1 %\n"
          f"{heads_table(results['heads'])}")
    head = best_head(run)
    print(f"\nbest head by val accuracy: {head}")
    shutil.rmtree(model_dir, ignore_errors=True)
    _stage(f"export {head}", timings, export_package, run, head, model_dir, command=command)
    return timings


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(model_dir: Path, port: int, sample: Path) -> int:
    """Start `bentoml serve` on the package, prove it answers, print a curl example, then wait (Ctrl-C stops)."""
    import httpx

    from ltserve.serve.process import ServerProcess

    server = ServerProcess({"LTSERVE_MODEL": str(model_dir.resolve())}, port=port, target=None, cwd=REPO)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server too, like Ctrl-C
    try:
        server.wait_ready()
        with open(sample, "rb") as f:
            reply = httpx.post(f"{server.url}/classify", files={"image": (sample.name, f, "image/png")}, timeout=30)
        print(f"\nserving {model_dir} at {server.url} (Ctrl-C to stop)\n\n"
              f"  curl -s -F image=@{sample} {server.url}/classify\n\nwhich answers:\n  {reply.text}\n", flush=True)
        return server.proc.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:  # exited or not ready: its output is already on the terminal
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()


def main(argv: list[str] | None = None, prog: str = "python -m ltserve.demo") -> int:
    """`make demo`, `python -m ltserve.demo` and `ltserve demo` (prog: the name --help shows)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--model", type=Path, default=Path("runs/demo-model"))
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--no-serve", action="store_true", help="stop after export (for scripts)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the run directory first (default: resume the run there, if any)")
    parser.add_argument("--command", default="make demo", help="the command recorded in the package's provenance")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not sys.stderr.isatty():
        # no progress bar is drawn into a log or CI output: stage 1 says one line per epoch there instead
        logging.getLogger("ltserve.train").setLevel(logging.INFO)

    from ltserve.errors import LtserveError

    t0 = time.perf_counter()
    try:
        timings = build(args.config, args.run, args.model, args.fresh, args.overrides, args.command)
    except LtserveError as exc:  # a user-fixable problem: the message says what to do, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    print("\nwall time per stage: " + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()))
    print(f"total wall time (after installation): {total:.0f} s\n\nmodel package: {args.model}\n"
          f"inspect it:    ltserve inspect {args.model}")
    if args.no_serve:
        return 0
    from ltserve.data import write_samples

    write_samples(args.run / "samples", 3)
    return serve(args.model, args.port, args.run / "samples" / "test_0.png")


if __name__ == "__main__":
    sys.exit(main())
