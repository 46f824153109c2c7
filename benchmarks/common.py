"""What every benchmark script shares: the machine's name and facts, percentiles, and the output trio
(results.json + results.md + a PNG) under `benchmarks/results/<machine>/<benchmark>/`."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
RESULTS_ROOT = Path(__file__).resolve().parent / "results"
PACKAGES = ("ltserve", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "torchvision", "timm", "bentoml",
            "pillow", "ray")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first CUDA device's name, without importing torch when it is not already loaded."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return None
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        return name
    except (OSError, IndexError, Exception):
        return None


def machine_slug(device: str = "cpu") -> str:
    """Folder name for results: 'cpu-<arch>-<N>c' or the GPU card, e.g. 'nvidia-h200'."""
    if device != "cpu":
        name = gpu_name()
        if name:
            return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def environment() -> dict[str, Any]:
    """Machine, versions and card: recorded in every results.json."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "machine": machine_slug("cpu"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # 1/5/15-minute load averages when the results were written: other work on a shared machine shows here
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of latency samples in milliseconds."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """--out, --seed, --smoke, --device (every benchmark script takes them)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default benchmarks/results/<machine>/{name})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the script, not speed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def output_dir(args: argparse.Namespace, name: str) -> Path:
    out = args.out or RESULTS_ROOT / (machine_slug(args.device) + ("-smoke" if args.smoke else "")) / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], floatfmt: str = "{:.2f}") -> str:
    """A GitHub Markdown table of `rows` restricted to `columns` (floats formatted, None as '-')."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "-" if v != v else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def each_run(jobs: Sequence[T], desc: str) -> Iterator[T]:
    """`jobs` one by one: a tqdm bar on a terminal (`ltserve.progress`); otherwise (CI, a log file) one line as each
    job starts, with the time since the first, instead of a redrawn bar."""
    from ltserve.progress import progress_bar

    started, tty = time.perf_counter(), sys.stderr.isatty()
    for k, job in enumerate(progress_bar(jobs, desc=desc, unit="run", leave=True)):
        if not tty:
            print(f"{desc}: {k + 1}/{len(jobs)} {job} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        yield job


def write_results(out: Path, name: str, config: dict[str, Any], results: Any, table_md: str,
                  plot: Callable[[Path], None] | None = None, notes: str = "") -> Path:
    """Write results.json (config, environment, results), results.md (title, machine, table) and results.png.

    Returns:
        the results.json path.
    """
    env = environment()
    payload = {"benchmark": name, "config": config, "environment": env, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=_jsonable))
    header = (f"# {name}\n\nMachine: {env['machine']} ({env['cpu']}, {env['cores']} cores"
              f"{', GPU ' + env['gpu'] if env['gpu'] else ''}); {env['date']}\n\n")
    (out / "results.md").write_text(header + table_md.rstrip() + "\n" + (f"\n{notes.rstrip()}\n" if notes else ""))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(out / "results.png")
    return out / "results.json"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)
