"""`ltserve rebalance runs/NAME [--heads a,b] [--no-cache] [--tau T] [--target-prior P] [--set k=v] [--json [PATH]]`:
stage 2."""

from __future__ import annotations

import argparse
from pathlib import Path

from ltserve.cli.common import add_json_option, emit_json
from ltserve.heads import HEADS


def cli(argv: list[str] | None = None) -> int:
    """Fit the heads, then print every head's val metrics (ECE before and after calibration) and what val chose."""
    parser = argparse.ArgumentParser(
        prog="ltserve rebalance",
        description="Stage 2: re-balance the classifier of a trained run on its cached features. Writes "
                    "heads/<head>.safetensors + .json; run.json, the backbone and the joint head are not changed.")
    parser.add_argument("run_dir", type=Path, help="the run directory (made by `ltserve train`)")
    parser.add_argument("--heads", default=None,
                        help=f"comma list of {','.join(HEADS.stage2())}, or all (default: rebalance.heads of the run)")
    parser.add_argument("--no-cache", action="store_true",
                        help="crt/lws: send augmented images through the frozen backbone every epoch instead of "
                             "training on cached features (slower; the official code's way)")
    parser.add_argument("--tau", type=float, default=None, help="fixed tau for tau_norm (default: swept on val)")
    parser.add_argument("--target-prior", default=None,
                        help="uniform | train | FILE of C class weights, added as log prior to every head's bias")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="rebalance.x=y",
                        help="override a rebalance setting for this invocation (repeatable)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's train.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_option(parser, "every head's val metrics and what val chose")
    args = parser.parse_args(argv)
    from ltserve.evaluate.selection import val_metrics
    from ltserve.evaluate.tables import chosen_value, heads_table
    from ltserve.rebalance import rebalance
    from ltserve.rundir import open_run

    run = open_run(args.run_dir)
    heads = rebalance(run, heads=args.heads, overrides=args.overrides,
                      use_cache=False if args.no_cache else None, tau=args.tau, target_prior=args.target_prior,
                      device=args.device, progress=not args.no_progress)
    rows = val_metrics(run, ["joint", *heads])
    for name in heads:
        rows[name] = {**rows[name], "chosen": chosen_value(name, heads[name].meta),
                      "temperature": heads[name].temperature}
    if emit_json(args.json, {"run": str(args.run_dir), "split": "val", "heads": rows,
                             "written": list(heads), "heads_dir": str(run.paths.heads)}):
        return 0
    print(f"\nval metrics of {args.run_dir} (Many/Medium/Few: mean per-class accuracy by training count; "
          "All: top-1)\n")
    print(heads_table(rows, columns=("many", "medium", "few", "top1", "ece_raw", "ece"),
                      extra=("chosen", "temperature")))
    print(f"\nheads written to {run.paths.heads}: {', '.join(heads)}")
    return 0
