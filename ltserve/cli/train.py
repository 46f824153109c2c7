"""`ltserve train CONFIG.yaml [--set section.field=value ...] --out runs/NAME [--resume] [--json [PATH]]`: stage 1,
then the val/test evaluation of the run (eval/) from the features stage 1 has just cached."""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from ltserve.cli.common import add_json_option, emit_json, wants_stdout_json
from ltserve.config import load_config


def cli(argv: Sequence[str] | None = None) -> int:
    """Train, then (rank 0, finished run) evaluate val and test and print the tables."""
    parser = argparse.ArgumentParser(
        prog="ltserve train", description="Stage 1: joint training of backbone + linear head (instance-balanced "
        "by default). Multi-GPU: torchrun --nproc_per_node N -m ltserve.cli train ...")
    parser.add_argument("config", help="recipe YAML, e.g. configs/fashion_lt.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set train.epochs=5")
    parser.add_argument("--out", required=True, help="run directory to write, e.g. runs/fashion_lt")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                        help="stop (resumably) once N epochs are done, e.g. for time-boxed jobs")
    parser.add_argument("--no-eval", action="store_true", help="skip the val/test evaluation at the end")
    parser.add_argument("--no-plots", action="store_true", help="evaluate without drawing the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_option(parser, "the run's summary (epochs, timings, losses) and its val/test reports")
    args = parser.parse_args(list(argv) if argv is not None else None)
    cfg = load_config(args.config, args.overrides)
    from ltserve.train import train

    info = train(cfg, args.out, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                 evaluate=not args.no_eval, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    m = info.train_metrics
    to_stdout = wants_stdout_json(args.json)
    report = {"run": str(args.out), "epochs_done": info.epochs_done, "epochs": cfg.train.epochs,
              "finished": info.finished, "train_metrics": m, "eval": {}}
    if not to_stdout:
        print(f"run {args.out}: {info.epochs_done}/{cfg.train.epochs} epochs, {m.get('train_seconds', 0):.1f} s, "
              f"{m.get('images_per_second', 0):.0f} img/s, final loss {m.get('final_loss') or float('nan'):.4f}")
    if info.finished and "eval" in m:
        from ltserve.evaluate import evaluate_run, heads_table

        for split in m["eval"]:
            results = evaluate_run(args.out, split, plots=not args.no_plots)
            report["eval"][split] = {"n": results["n"], "heads": results["heads"], "files": results["files"]}
            if not to_stdout:
                print(f"\n{split} ({results['n']} images)")
                print(heads_table(results["heads"]))
    emit_json(args.json, report)
    return 0
