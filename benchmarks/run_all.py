"""Run every benchmark with budgets sized for the device, then regenerate docs/performance.md and the README's
performance summary (`benchmarks.perf_readme`).

    python -m benchmarks.run_all --device cpu                  # `make bench`: ~1 hour on 2 cores
    python -m benchmarks.run_all --smoke --out /tmp/b          # every script in its smoke mode (seconds each)
    python -m benchmarks.run_all --only model_latency,accuracy --dry-run

Order and budgets (CPU):
  accuracy       Fashion-MNIST-LT rho 100 / 50, 3 seeds, 30 epochs (~30 min); its first run (rho 100, seed 0) is
                 kept as the demo run for the next steps
  model_latency  the demo run + ResNet-50 224 px joint/folded; batches 1, 8, 32, 128 (~10 min)
  stage2         cached features vs --no-cache on the demo run
  serve_load     `bentoml serve` vs in process (5 s per point)
  batch_predict  `ltserve predict` vs a naive loop
  decode         JPEG decode + preprocess images/s on one core, exact vs draft, inputs 32-224 px (~30 s)
  sampler_ablation  stage-1 IB / CB / SR / PB x every head, rho 100, 3 seeds, the recipe's 60 epochs (~10 min)
  accuracy_int8  `accuracy --int8 best`: int8 vs fp32 packages on the embedded default as shipped, 3 seeds (~10 min)
  int8_placement which nodes int8 keeps float: ResNet-50 speed + embedded-default accuracy (~15 min)
  label_shift    live prior estimation and adaptation: every head of a default-recipe run on skewed Fashion-MNIST test
                 streams, and the estimator's cost per request (~5 min)
  model_latency_int8, serve_load_int8  the same scripts with `--precisions fp32,int8`: int8 beside fp32 (ResNet-18
                 and ResNet-50 224 px, the demo model, batch 1 and 8; the ResNet-18 service at concurrency 1 and 16)
Scripts that are missing are skipped; a failing script is reported and the others still run. Each script's options
are passed only when its `--help` lists them, so the runner keeps working while the scripts evolve. Logs go to
`<work>/logs/<script>.log`; each script writes its results into `benchmarks/results/<machine>/<script>/` (or
`--out ROOT/<script>`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.common import RESULTS_ROOT, machine_slug, markdown_table

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


@dataclass
class Context:
    device: str
    smoke: bool
    work: Path
    out_root: Path | None
    demo_run: Path | None = None


@dataclass
class Step:
    """One benchmark script: options (flag -> value, passed when its --help lists the flag) and a time limit."""

    name: str
    options: Callable[[Context], dict[str, str | None]] = lambda ctx: {}
    script: str | None = None
    """The script to run when it is not `name` (the results folder is always `name`)."""
    positional: Callable[[Context], list[str]] = lambda ctx: []
    timeout_s: float = 1800.0
    smoke_timeout_s: float = 300.0
    after: Callable[[Context], None] | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _accuracy_after(ctx: Context) -> None:
    runs = sorted((ctx.work / "accuracy").glob("00-seed*"))
    if runs and (runs[0] / "run.json").is_file():
        ctx.demo_run = runs[0]


STEPS = (
    Step("accuracy", options=lambda ctx: {"--work": str(ctx.work / "accuracy")}, timeout_s=3 * 3600,
         after=_accuracy_after),
    Step("model_latency", options=lambda ctx: {"--model": str(ctx.demo_run)} if ctx.demo_run else {},
         timeout_s=2 * 3600),
    Step("model_latency_int8", script="model_latency", timeout_s=3600, options=lambda ctx: {
        "--precisions": "fp32,int8", "--heads": "joint", **({} if ctx.smoke else {
            "--arch": "resnet18,resnet50", "--batches": "1,8"}),
        **({"--model": str(ctx.demo_run)} if ctx.demo_run else {})}),
    Step("stage2", positional=lambda ctx: [str(ctx.demo_run)] if ctx.demo_run and not ctx.smoke else [],
         timeout_s=3600),
    Step("serve_load", options=lambda ctx: {} if ctx.smoke else {"--duration": "5"}, timeout_s=3600),
    Step("serve_load_int8", script="serve_load", timeout_s=3600, options=lambda ctx: {} if ctx.smoke else {
        "--models": "resnet18", "--precisions": "fp32,int8", "--concurrency": "1,16", "--repeat": "3"}),
    Step("batch_predict", timeout_s=3600),
    Step("decode", timeout_s=1800),
    Step("sampler_ablation", timeout_s=2 * 3600),
    Step("accuracy_int8", script="accuracy", options=lambda ctx: {"--int8": "best"}, timeout_s=2 * 3600),
    Step("int8_placement", timeout_s=2 * 3600),
    Step("label_shift", timeout_s=1800),
)


def help_text(name: str) -> str:
    """The script's --help output ('' when it cannot run)."""
    try:
        out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def command(step: Step, ctx: Context, help_: str) -> list[str]:
    """The command line of one step: common options + the step's, each only when --help lists it."""
    opts: dict[str, str | None] = {"--device": ctx.device}
    if ctx.smoke:
        opts["--smoke"] = None
    if ctx.out_root is not None:
        opts["--out"] = str(ctx.out_root / step.name)
    opts.update(step.options(ctx))
    cmd = [sys.executable, "-m", f"benchmarks.{step.script or step.name}"]
    for flag, value in opts.items():
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_):
            continue
        cmd += [flag] if value is None else [flag, value]
    return cmd + step.positional(ctx)


def run_step(step: Step, ctx: Context, dry_run: bool) -> dict[str, object]:
    """Run one script with its time limit; never raises."""
    if not (BENCH / f"{step.script or step.name}.py").is_file():
        return {"script": step.name, "status": "missing", "seconds": 0.0}
    help_ = help_text(step.script or step.name)
    if not help_:
        return {"script": step.name, "status": "broken (--help fails)", "seconds": 0.0}
    if step.name == "stage2" and not ctx.smoke and ctx.demo_run is None:
        return {"script": step.name, "status": "skipped (no demo run: accuracy did not finish)", "seconds": 0.0}
    cmd = command(step, ctx, help_)
    print(f"\n=== {step.name}: {' '.join(cmd[2:])}", flush=True)
    if dry_run:
        return {"script": step.name, "status": "dry run", "seconds": 0.0, "command": " ".join(cmd[1:])}
    log_path = ctx.work / "logs" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    limit = step.smoke_timeout_s if ctx.smoke else step.timeout_s
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the script and any server it started
            proc.wait()
            status = f"timed out after {limit:.0f} s"
    seconds = time.perf_counter() - start
    print(f"--- {step.name}: {status} in {seconds:.0f} s (log: {log_path})", flush=True)
    if status != "ok":
        print("".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:]), flush=True)
    elif step.after is not None:
        step.after(ctx)
    return {"script": step.name, "status": status, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--smoke", action="store_true", help="every script in its smoke mode")
    parser.add_argument("--out", type=Path, default=None, help="results root: each script writes ROOT/<script>/ "
                        "(default benchmarks/results/<machine>/)")
    parser.add_argument("--only", default=None, help="comma-separated scripts to run")
    parser.add_argument("--skip", default="", help="comma-separated scripts to skip")
    parser.add_argument("--work", type=Path, default=None, help="work folder for runs and logs (default: tmp)")
    parser.add_argument("--demo-run", type=Path, default=None, help="a trained run for model_latency and stage2 "
                        "(default: the accuracy benchmark's first run)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="README to regenerate (default README.md; with --smoke or --out only when given)")
    parser.add_argument("--no-readme", action="store_true", help="do not regenerate the README section")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="ltserve-bench-all-"))
    ctx = Context(args.device, args.smoke, work, args.out, args.demo_run)
    names = [s.name for s in STEPS]
    only = set(args.only.split(",")) if args.only else set(names)
    unknown = (only | set(filter(None, args.skip.split(",")))) - set(names)
    if unknown:
        parser.error(f"unknown script(s) {', '.join(sorted(unknown))}; known: {', '.join(names)}")
    rows = [run_step(s, ctx, args.dry_run) for s in STEPS if s.name in only and s.name not in args.skip.split(",")]
    print("\n" + markdown_table(rows, ["script", "status", "seconds"], floatfmt="{:.0f}"))
    readme = args.readme or (None if (args.smoke or args.out) else REPO / "README.md")
    if readme is not None and not args.no_readme and not args.dry_run:
        results_root = args.out.parent if args.out is not None else RESULTS_ROOT
        cmd = [sys.executable, "-m", "benchmarks.perf_readme", "--results", str(results_root), "--readme",
               str(readme)] + (["--include-smoke"] if args.smoke else []) + \
            (["--machine", args.out.name] if args.out is not None else [])
        subprocess.run(cmd, cwd=REPO, check=False)
    print(f"machine: {machine_slug(args.device)}; logs in {work / 'logs'}")
    return 0 if all(r["status"] in ("ok", "missing", "dry run") or str(r["status"]).startswith("skipped")
                    for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
