"""`ltserve inspect models/NAME`: show a model package and verify every file's sha256.

Prints the labels (with training counts and shot groups), the head and its parameters, the recorded metrics and
verification, the preprocessing and the graph, then every listed file with its check. Exits non-zero (through
`ltserve`'s error handling: "error: ...", status 2) when model.json is missing or invalid or a file is missing,
corrupted or swapped. No torch and no onnxruntime here: only model.json and the files' bytes are read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ltserve.cli.common import STDOUT, add_json_option, emit_json, wants_stdout_json
from ltserve.errors import PackageError
from ltserve.metrics import SHOT_GROUPS, format_percent
from ltserve.package import MODEL_JSON, ModelJson, read_model_json
from ltserve.fileio import sha256_file


def check_files(model_dir: str | Path, meta: ModelJson) -> list[tuple[str, str]]:
    """Check every listed file against model.json.

    Returns:
        (file name, status) for each listed file: "ok", "missing", "size differs", "sha256 differs", in order.
    """
    root = Path(model_dir)
    out = []
    for name, entry in meta.files.items():
        path = root / name
        if not path.is_file():
            status = "missing"
        elif path.stat().st_size != entry.bytes:
            status = "size differs"
        elif sha256_file(path) != entry.sha256:
            status = "sha256 differs"
        else:
            status = "ok"
        out.append((name, status))
    return out


def unlisted_files(model_dir: str | Path, meta: ModelJson) -> list[str]:
    """Files in the package folder that model.json does not list (e.g. a stray external-data file)."""
    root = Path(model_dir)
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MODEL_JSON and p.name not in meta.files)


def _metric_line(name: str, m: dict[str, Any]) -> str:
    parts = [f"{k} {format_percent(m.get(k))}" for k in ("top1", "balanced_accuracy", *SHOT_GROUPS) if k in m]
    n = f" (n={m['n']})" if "n" in m else ""
    return f"  {name}{n}: " + ", ".join(parts)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_value(v)}" for k, v in value.items() if not isinstance(v, (list, dict)))
    return str(value)


_GROUPS = {"many": "Many", "medium": "Medium", "few": "Few", "top1": "All"}


def _group_changes(r: dict[str, Any], base: str, after_default: dict[str, Any] | None = None) -> str:
    """Each group's accuracy exact -> faster path with the change in points and its bound: "Many 90.0 -> 89.5
    (-0.50, bound -1.00), ..." (a `compare_groups` report; `after_default`: older fp16 reports' key)."""
    bounds = r.get("max_accuracy_drop")
    groups = []
    for key, label in _GROUPS.items():
        before, after = r.get(f"accuracy_{base}", {}).get(key), r.get("accuracy", after_default or {}).get(key)
        if before is None or after is None:
            continue
        limit = bounds.get(key) if isinstance(bounds, dict) else bounds
        groups.append(f"{label} {before * 100:.1f} -> {after * 100:.1f} ({(after - before) * 100:+.2f}"
                      + (f", bound -{limit * 100:.2f})" if limit is not None else ")"))
    return ", ".join(groups)


def draft_lines(meta: ModelJson) -> list[str]:
    """Whether the package decodes JPEGs in draft mode and why (the export summary and `ltserve inspect`)."""
    state = "on" if meta.preprocess.allow_draft else "off"
    r = meta.verification.get("jpeg_draft")
    if not r:
        return [f"JPEG draft decoding: {state} (not checked: exported before ltserve checked it)"]
    lines = [f"JPEG draft decoding: {state} (--jpeg-draft {r['mode']}): {r['reason']}"]
    if "accuracy_exact" in r:
        lines.append(f"  draft vs exact decoding on the same {r['images']} {r['split']} images "
                     f"({r['images_affected']} decoded differently, mean |pixel diff| "
                     f"{r['mean_abs_pixel_diff']:.2f} levels): top-1 agreement {r['top1_agreement_vs_exact']:.4f}; "
                     + _group_changes(r, "exact"))
    return lines


def open_set_lines(meta: ModelJson) -> list[str]:
    """Open-set rejection (the export summary and `ltserve inspect`): score, why, target, thresholds per shot group
    and per class, and the val acceptance they give."""
    o = meta.open_set
    if o is None:
        return ["open-set rejection: none (exported before ltserve calibrated it: no unknown / ood_score answers)"]
    groups = ", ".join(f"{g} {'-' if t is None else f'{t:.4g}'}" for g, t in o.group_thresholds.items())
    acc = o.val_accepted.get("by_true_group", {})
    lines = [f"open-set rejection: score {o.score} ({o.chosen_by}); target {o.target:.0%} of known {o.split} images "
             f"accepted in every shot group ({o.n} images)",
             f"  thresholds (unknown when the score exceeds its predicted class's): by group {groups}",
             "  per class: " + ", ".join(f"{label} {t:.4g} ({s})" for label, t, s in
                                        zip(meta.labels, o.thresholds, o.threshold_source)),
             "  val accepted by true shot group: " + ", ".join(
                 f"{g} {'-' if v is None else f'{v:.1%}'}" for g, v in acc.items()),
             f"  features output: {meta.features_name or 'none'}"]
    return lines


def precision_lines(verification: dict[str, Any]) -> list[str]:
    """fp16 / int8 against fp32 (the export summary and `ltserve inspect`): agreement, each group's accuracy
    fp32 -> reduced with the change in points and its bound, and for int8 the calibration sample and the nodes kept
    in float."""
    lines = []
    for precision in ("fp16", "int8"):
        r = verification.get(precision)
        if not r:
            continue
        lines.append(f"{precision} vs fp32 on the same {r.get('images', '?')} images: top-1 agreement "
                     f"{r['top1_agreement_vs_fp32']:.4f}; " + _group_changes(r, "fp32", r.get("accuracy_fp16")))
        if precision == "int8":
            c, st = r["calibration"], r["settings"]
            lines.append(f"  calibrated on {c['images']} {c['split']} images ({c['per_class_min']}-"
                         f"{c['per_class_max']} per class over {c['classes']} classes, seed {c['seed']}, "
                         f"{c['method']}); {st['format']}: weights {st['weights']}"
                         f"{' (7-bit range)' if st.get('reduce_range') else ''}, activations {st['activations']}")
            kept = ", ".join(f"{f['node']} ({f['op']}, {f['why']})" for f in r["float_nodes"]) or "none"
            lines.append(f"  kept in float: {kept}; accepted at attempt {len(r['attempts'])}")
    return lines


def describe(meta: ModelJson) -> list[str]:
    """The human-readable summary of a package's model.json, one string per line."""
    lines = [f"model package {meta.name!r} (schema {meta.schema_version})", "",
             f"labels ({len(meta.labels)} classes; shot groups by training count: many > {meta.shot_thresholds.many}, "
             f"few < {meta.shot_thresholds.few}):"]
    width = max(len(label) for label in meta.labels)
    for i, (label, n, g) in enumerate(zip(meta.labels, meta.class_counts, meta.shot_groups)):
        lines.append(f"  {i:>4}  {label:<{width}}  {n:>7}  {g}")
    lines += ["", f"head: {meta.head.name} (temperature {meta.head.temperature:.4g})"]
    lines += [f"  {k}: {_fmt_value(v)}" for k, v in meta.head.params.items()]
    lines += ["", "metrics:"]
    for name, m in meta.metrics.items():
        lines.append(_metric_line(name, m) if isinstance(m, dict) else f"  {name}: {m}")
    if not meta.metrics:
        lines.append("  (none recorded)")
    v = meta.verification
    if "fp32" in v:
        inputs = v.get("inputs", {})
        lines += ["", f"verification on {inputs.get('images', '?')} {inputs.get('split', '')} "
                      f"images: max |ONNX - unfolded| {v['fp32']['max_abs_diff']:.3g} (tolerance "
                      f"{v['fp32']['tolerance']:.3g}, {v['fp32'].get('compared', '')}), top-1 agreement "
                      f"{v['fp32']['top1_agreement']:.4f}"]
    lines += [f"  warning: {w}" for w in v.get("warnings", [])]
    lines += [f"  {line}" for line in [*precision_lines(v), *draft_lines(meta)]]
    lines += ["", *open_set_lines(meta)]
    p = meta.preprocess
    lines += ["", f"preprocess: resize {p.resize} ({p.interpolation}), centre crop {p.crop}, {p.channels} channel(s), "
                  f"mean {list(p.mean)}, std {list(p.std)}{', JPEG draft allowed' if p.allow_draft else ''}",
              f"input {meta.input_name!r} float32 (N, {p.channels}, {p.crop}, {p.crop}) -> output "
              f"{meta.output_name!r} (N, {len(meta.labels)})"
              + (f", {meta.features_name!r} (N, D)" if meta.features_name else ""),
              f"graph: opset {meta.graph.opset}, {meta.graph.nodes} nodes, {meta.graph.precision}; "
              + ", ".join(f"{op} {n}" for op, n in meta.graph.op_counts.items())]
    pv = meta.provenance
    lines += [f"provenance: ltserve {pv.ltserve_version}, commit {pv.git_commit or 'unknown'}, config "
              f"{pv.config_hash or '-'}, created {pv.created}, run {pv.run or '-'}",
              f"  command: {pv.command or '-'}"]
    return lines


def inspect_package(model_dir: str | Path) -> tuple[ModelJson, list[str], list[str]]:
    """Read, describe and check a package.

    Returns:
        (model.json, summary lines including one line per file, problems: one "PATH: status" per bad file).

    Raises:
        PackageError: model.json is missing or invalid (names the file and the problem).
    """
    meta = read_model_json(model_dir)
    lines = describe(meta)
    results = check_files(model_dir, meta)
    lines += ["", "files:"]
    for name, status in results:
        entry = meta.files[name]
        lines.append(f"  {name:<12} {entry.bytes:>12,} bytes  sha256 {entry.sha256[:16]}...  {status}")
    for name in unlisted_files(model_dir, meta):
        lines.append(f"  {name:<12} not listed in model.json (ignored by serving)")
    problems = [f"{Path(model_dir) / n}: {s}" for n, s in results if s != "ok"]
    return meta, lines, problems


def cli(argv: list[str] | None = None) -> int:
    """`ltserve inspect MODEL_DIR [--json [PATH]]`.

    Raises:
        PackageError: model.json missing or invalid, or a file missing / corrupted / swapped (after printing the
            summary); `ltserve` prints it as "error: ..." and exits with status 2.
    """
    p = argparse.ArgumentParser(prog="ltserve inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, nargs="?", metavar="MODEL_DIR",
                   help="the model package folder (models/NAME)")
    add_json_option(p, "model.json (validated)")
    args = p.parse_args(argv)
    if args.model_dir is None and args.json not in (None, STDOUT) and Path(args.json, MODEL_JSON).is_file():
        args.model_dir, args.json = Path(args.json), STDOUT  # `inspect --json MODEL_DIR`: --json was a bare flag
    if args.model_dir is None:
        p.error("the following arguments are required: MODEL_DIR")
    meta, lines, problems = inspect_package(args.model_dir)
    if not emit_json(args.json, meta.model_dump(mode="json")):
        print("\n".join(lines))
    if problems:
        raise PackageError("model package failed its sha256 check (file corrupted, swapped or missing; re-export it "
                           "with `ltserve export`):\n  " + "\n  ".join(problems))
    print(f"\nOK: {len(meta.files)} file(s) verified", file=sys.stderr if wants_stdout_json(args.json) else sys.stdout)
    return 0
