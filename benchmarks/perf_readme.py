"""Generate docs/performance.md and the README's performance summary from the committed benchmark results (never
copied by hand).

    python -m benchmarks.perf_readme                 # rewrite docs/performance.md and the README's summary
    python -m benchmarks.perf_readme --check         # exit 1 when either is out of date (CI)
    python -m benchmarks.perf_readme --summary DIR   # print the goals of one machine's results folder

Reads `benchmarks/results/<machine>/<benchmark>/results.json` (machine folders ending in `-smoke` are skipped unless
`--include-smoke`) and writes two generated sections, each between its markers (text outside them stays):

- docs/performance.md (`--doc`; default: docs/performance.md beside the README), between `<!-- perf:start -->` and
  `<!-- perf:end -->`: one table of every goal a benchmark reported (`results["goals"]`: goal, target, measured,
  met), plus the GPU service goal derived from serve_load on GPU machines (HTTP throughput >= half the CPU decode
  ceiling); then per benchmark and machine: the machine (CPU model and cores, GPU), date and versions, and a compact
  table (model_latency with its int8 speed-ups, accuracy, accuracy_int8, int8_placement) or the benchmark's own
  results.md table. A missing page is created with a title; a page without markers gets them appended.
- README.md (`--readme`), between `<!-- perf-summary:start -->` and `<!-- perf-summary:end -->`: one row per
  benchmark and machine with goals, how many are met, and the ones that are not. Without these markers the README
  is left as it is (a note on stderr).

Goals of `gpu_preprocess_check` measured on a machine without a GPU are labelled CPU stand-ins: the device path ran
on the CPU there, so they say nothing about a GPU yet. Both sections are deterministic for given results files, so
`--check` can guard them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_ROOT, markdown_table

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
SUMMARY_START, SUMMARY_END = "<!-- perf-summary:start -->", "<!-- perf-summary:end -->"
STAND_IN = "CPU stand-in, not a GPU result (no GPU session has run it): "
DOC_HEAD = """# Performance

Generated from the committed results in `benchmarks/results/` by `python -m benchmarks.perf_readme`, which also
writes the short summary in the README (`make bench` measures them again on your machine; `make bench-gpu` runs
`benchmarks/gpu_run.sh` on a GPU machine). Every figure names the machine it was measured on; compare ratios within
one run only.

"""
REPO = Path(__file__).resolve().parents[1]
ORDER = ("model_latency", "model_latency_int8", "serve_load", "serve_load_int8", "serve_overhead", "batch_predict",
         "decode", "stage2", "accuracy", "accuracy_int8", "int8_placement", "sampler_ablation", "label_shift")
MET_WORDS = {True: "yes", False: "**no**", None: "not measured"}


def load_results(root: Path, include_smoke: bool = False) -> list[dict[str, Any]]:
    """Every results.json under root/<machine>/<benchmark>/, sorted by benchmark order then machine.

    Each item gets "_machine_dir", "_dir" (Path) added. Unreadable files are skipped with a note on stderr.
    """
    items = []
    for path in sorted(root.glob("*/*/results.json")):
        machine_dir = path.parent.parent.name
        if machine_dir.endswith("-smoke") and not include_smoke:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"perf_readme: skipping {path}: {exc}", file=sys.stderr)
            continue
        data["_machine_dir"], data["_dir"] = machine_dir, path.parent
        data.setdefault("benchmark", path.parent.name)
        items.append(data)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(items, key=lambda d: (rank.get(d["benchmark"], len(ORDER)), d["benchmark"], d["_machine_dir"]))


def machine_label(item: dict[str, Any]) -> str:
    """'NVIDIA H100 80GB HBM3 (host: AMD EPYC ..., 16 cores)' or 'AMD EPYC ... , 2 cores' + the folder name."""
    env = item.get("environment", {})
    res = item.get("results")
    gpu = env.get("gpu") or (res.get("card") if isinstance(res, dict) else None)
    cpu = f"{env.get('cpu', '?')}, {env.get('cores', '?')} cores"
    return (f"{gpu} (host: {cpu})" if gpu else cpu) + f" [`{item['_machine_dir']}`]"


def versions_line(item: dict[str, Any]) -> str:
    env = item.get("environment", {})
    v = env.get("versions", {})
    keys = ("torch", "onnxruntime", "onnxruntime-gpu", "bentoml", "numpy", "pillow")
    parts = [f"{k} {v[k]}" for k in keys if k in v]
    load = env.get("load_average")
    busy = f"; load average {load[0]:.1f} when written" if load else ""
    return f"{env.get('date', '?')}; Python {env.get('python', '?')}; " + ", ".join(parts) + busy


def goals_of(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals a results file reports, plus derived ones (GPU service vs the CPU decode ceiling)."""
    res = item.get("results")
    out = [dict(g) for g in res.get("goals", [])] if isinstance(res, dict) else []
    if item["benchmark"] == "gpu_preprocess_check" and not item.get("environment", {}).get("gpu"):
        out = [{**g, "goal": STAND_IN + str(g.get("goal", ""))} for g in out]
    if item["benchmark"].startswith("serve_load") and isinstance(res, dict) and item.get("environment", {}).get("gpu"):
        goal = gpu_service_goal(res)
        if goal:
            out.append(goal)
    return out


def gpu_service_goal(res: dict[str, Any]) -> dict[str, Any] | None:
    """Best HTTP throughput of serve_load vs half of its CPU decode ceiling (every core decoding) in the same run.

    Runs from before serve_load measured that ceiling give a row that says so (met: None), not a comparison
    against some other in-process figure.
    """
    best: tuple[float, str, float] | None = None
    unmeasured: tuple[float, str] | None = None
    for model, r in res.items():
        if not isinstance(r, dict) or "in_process" not in r:
            continue
        rows = [row for rows in (r.get("http") or {}).values() for row in rows if isinstance(row, dict)]
        top = max((row.get("req_s") or 0.0 for row in rows), default=0.0)
        ceiling = r["in_process"].get("cpu_decode_img_s")
        if not ceiling:
            unmeasured = max(unmeasured or (0.0, model), (top, model))
        elif best is None or top / ceiling > best[0] / best[2]:
            best = (top, model, ceiling)
    goal = "GPU service end to end ({}) vs the CPU decode ceiling of the same run"
    if best is None:
        if unmeasured is None:
            return None
        top, model = unmeasured
        return {"goal": goal.format(model), "target": ">= 50 % of the ceiling",
                "measured": f"{top:,.0f} req/s; the decode ceiling was not measured in this run", "met": None}
    top, model, ceiling = best
    return {"goal": goal.format(model), "target": ">= 50 % of the ceiling", "measured": f"{top:,.0f} req/s = "
            f"{100 * top / ceiling:.0f} % of {ceiling:,.0f} img/s", "met": top >= 0.5 * ceiling}


def model_latency_table(res: dict[str, Any]) -> str:
    """p50 at batch 1 and throughput at the largest batch, per (model, head, backend)."""
    rows = res.get("rows", [])
    keys = list(dict.fromkeys((r["model"], r["head"], r["backend"]) for r in rows))
    out = []
    for model, head, backend in keys:
        sub = [r for r in rows if (r["model"], r["head"], r["backend"]) == (model, head, backend)]
        b1 = next((r for r in sub if r["batch"] == 1), None)
        big = max(sub, key=lambda r: r["batch"])
        out.append({"model": model, "head": head, "runtime": backend,
                    "p50 b1 (ms)": b1["p50_ms"] if b1 else None, "p99 b1 (ms)": b1["p99_ms"] if b1 else None,
                    "largest batch": big["batch"], "img/s": big["img_per_s"]})
    return markdown_table(out, ["model", "head", "runtime", "p50 b1 (ms)", "p99 b1 (ms)", "largest batch", "img/s"],
                          floatfmt="{:,.2f}")


def accuracy_table(res: dict[str, Any]) -> str:
    return markdown_table(res.get("rows", []), ["setting", "head", "Many", "Medium", "Few", "All", "seeds"])


def int8_speedup_table(res: dict[str, Any]) -> str:
    """model_latency's int8 rows: p50 of fp32, int8 and PyTorch eager, and the int8 speed-ups, per batch."""
    rows = [{**r, "vs ORT fp32": f"{r['vs_fp32']:.2f}x" if r.get("vs_fp32") else None,
             "vs PyTorch eager": f"{r['vs_eager']:.2f}x" if r.get("vs_eager") else None}
            for r in res.get("int8_ratios") or []]
    return markdown_table(rows, ["model", "head", "batch", "fp32_p50_ms", "int8_p50_ms", "eager_p50_ms", "vs ORT fp32",
                                 "vs PyTorch eager", "top1_agree_fp32"])


def accuracy_int8_table(res: dict[str, Any]) -> str:
    """Per seed: Few and All of the fp32 and int8 packages and the change (points), agreement, what export did."""
    cols = ["seed", "head", "Many fp32", "Many int8", "Few fp32", "Few int8", "dFew", "All fp32", "All int8", "dAll",
            "agreement", "export"]
    return markdown_table(res.get("per_seed", []), cols)


def int8_placement_table(res: dict[str, Any]) -> str:
    rows = res.get("summary", [])
    return markdown_table(rows, list(dict.fromkeys(k for r in rows for k in r)))


def own_table(item: dict[str, Any]) -> str:
    """The benchmark's own results.md, without its title and machine lines."""
    path = item["_dir"] / "results.md"
    if not path.is_file():
        return "_(no results.md)_"
    lines = path.read_text().splitlines()
    body = [ln for ln in lines if not ln.startswith("# ") and not ln.startswith("Machine: ")]
    text = "\n".join(body).strip()
    # headings of the results file sit below the page's "### <benchmark>" heading, the first line included
    return re.sub(r"^#{1,2} ", "##### ", text, flags=re.MULTILINE)


def render(items: list[dict[str, Any]], root: Path) -> str:
    """The whole section, markers included."""
    try:
        shown_root = root.resolve().relative_to(REPO)
    except ValueError:
        shown_root = root
    lines = [START, f"<!-- generated by `python -m benchmarks.perf_readme` from {shown_root}/*/*/results.json: "
             "do not edit by hand; every figure names the machine it was measured on -->", ""]
    if not items:
        lines += ["No benchmark results committed yet: run `make bench`.", "", END]
        return "\n".join(lines)
    goal_rows = [{**g, "met": MET_WORDS[g.get("met")], "machine": machine_label(it),
                  "benchmark": it["benchmark"]} for it in items for g in goals_of(it)]
    if goal_rows:
        columns = ["goal", "target", "measured", "met", "machine", "benchmark"]
        lines += ["### Goals", "", markdown_table(goal_rows, columns), ""]
    for it in items:
        res = it.get("results")
        lines += [f"### {it['benchmark']} on {machine_label(it)}", "", f"_{versions_line(it)}_", ""]
        if it["benchmark"] in ("model_latency", "model_latency_int8") and isinstance(res, dict) and res.get("rows"):
            lines += [model_latency_table(res), ""]
            if res.get("int8_ratios"):
                lines += ["int8 speed-up (ratios of p50 latency measured in the same interleaved rounds):", "",
                          int8_speedup_table(res), ""]
            lines += [f"Full table, fold ratios and graphs: `{_rel(it['_dir'] / 'results.md')}`.", ""]
        elif it["benchmark"] in ("accuracy_int8", "int8_placement") and isinstance(res, dict):
            table = accuracy_int8_table(res) if it["benchmark"] == "accuracy_int8" else int8_placement_table(res)
            lines += [table, "", _notes_of(it), "",
                      f"Full tables: `{_rel(it['_dir'] / 'results.md')}`.", ""]
        elif it["benchmark"] == "accuracy" and isinstance(res, dict) and res.get("rows"):
            lines += [accuracy_table(res), ""]
            note = _notes_of(it)
            if note:
                lines += [note, ""]
        else:
            lines += [own_table(it), ""]
    lines.append(END)
    return "\n".join(lines)


def short_machine(item: dict[str, Any]) -> str:
    """'NVIDIA H200' or 'AMD EPYC, 2 cores', and the folder name."""
    env = item.get("environment", {})
    res = item.get("results")
    gpu = env.get("gpu") or (res.get("card") if isinstance(res, dict) else None)
    return f"{gpu or env.get('cpu', '?') + ', ' + str(env.get('cores', '?')) + ' cores'} [`{item['_machine_dir']}`]"


def render_summary(items: list[dict[str, Any]], doc_link: str) -> str:
    """The README's summary, markers included: per benchmark and machine, goals met, and those not met."""
    lines = [SUMMARY_START, f"<!-- generated by `python -m benchmarks.perf_readme` with {doc_link}: do not edit by "
             "hand -->", ""]
    rows = []
    for it in items:
        goals = goals_of(it)
        if not goals:
            continue
        met = sum(1 for g in goals if g.get("met") is True)
        missed = [f"{g.get('goal')}: {g.get('measured')}" + (f" (target {g['target']})" if g.get("target") else "")
                  + ("" if g.get("met") is False else " [not measured]")
                  for g in goals if g.get("met") is not True]
        label = it["benchmark"] + (" (CPU stand-in)" if goals[0]["goal"].startswith(STAND_IN) else "")
        rows.append({"benchmark": label, "machine": short_machine(it), "met": f"{met} of {len(goals)}",
                     "not met": "; ".join(missed) if missed else "-"})
    if rows:
        lines += [markdown_table(rows, ["benchmark", "machine", "met", "not met"]), ""]
    else:
        lines += ["No benchmark results committed yet: run `make bench`.", ""]
    lines.append(SUMMARY_END)
    return "\n".join(lines)


def _notes_of(item: dict[str, Any]) -> str:
    path = item["_dir"] / "results.md"
    if not path.is_file():
        return ""
    paras = [p.strip() for p in path.read_text().split("\n\n")]
    return next((p for p in reversed(paras) if p and not p.startswith("|") and not p.startswith("#")), "")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def has_markers(text: str, start: str = START, end: str = END) -> bool:
    return start in text and end in text and text.index(start) < text.index(end)


def splice(readme: str, section: str, start: str = START, end: str = END) -> str:
    """Replace the text between the markers (inclusive) with `section`; without markers, append a
    "## Performance" heading and the section at the end."""
    if has_markers(readme, start, end):
        head, rest = readme.split(start, 1)
        tail = rest.split(end, 1)[1]
        return head + section + tail
    return readme.rstrip("\n") + ("\n\n" if readme.strip() else "") + "## Performance\n\n" + section + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_readme", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_ROOT, help="results root (<machine>/<benchmark>/)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md",
                        help="the README whose summary is written between the perf-summary markers")
    parser.add_argument("--doc", type=Path, default=None,
                        help="the page of the full section (default: docs/performance.md beside the README)")
    parser.add_argument("--include-smoke", action="store_true", help="also use <machine>-smoke folders")
    parser.add_argument("--machine", action="append", default=None,
                        help="only these machine folders (repeatable; default all)")
    parser.add_argument("--check", action="store_true",
                        help="only check that docs/performance.md and the README's summary are up to date")
    parser.add_argument("--summary", type=Path, default=None,
                        help="print the goals found in one machine folder (<DIR>/<benchmark>/results.json) and exit")
    args = parser.parse_args(argv)
    if args.summary is not None:
        items = load_results(args.summary.parent, include_smoke=True)
        items = [it for it in items if it["_machine_dir"] == args.summary.name]
        for it in items:
            for g in goals_of(it):
                print(f"[met: {MET_WORDS[g.get('met')].strip('*')}] {g['goal']}: {g['measured']} "
                      f"(target {g.get('target', '-')})")
        print(f"{len(items)} results files in {args.summary}")
        return 0
    items = [it for it in load_results(args.results, args.include_smoke)
             if args.machine is None or it["_machine_dir"] in args.machine]
    doc = args.doc or args.readme.parent / "docs" / "performance.md"
    old_doc = doc.read_text() if doc.is_file() else DOC_HEAD
    new_doc = splice(old_doc, render(items, args.results)) if has_markers(old_doc) else \
        old_doc.rstrip("\n") + "\n\n" + render(items, args.results) + "\n"
    old_readme = args.readme.read_text() if args.readme.is_file() else ""
    new_readme = old_readme
    if has_markers(old_readme, SUMMARY_START, SUMMARY_END):
        link = os.path.relpath(doc, args.readme.parent)
        new_readme = splice(old_readme, render_summary(items, link), SUMMARY_START, SUMMARY_END)
    else:
        print(f"perf_readme: {args.readme} has no {SUMMARY_START} ... {SUMMARY_END} markers; its summary is not "
              "written", file=sys.stderr)
    outputs = [(doc, old_doc if doc.is_file() else None, new_doc), (args.readme, old_readme, new_readme)]
    if args.check:
        stale = [path for path, old, new in outputs if new != old]
        for path in stale:
            print(f"{path}: the generated performance section is out of date; run `python -m benchmarks.perf_readme`",
                  file=sys.stderr)
        if not stale:
            print(f"{doc} and {args.readme}: performance sections up to date")
        return 1 if stale else 0
    for path, old, new in outputs:
        if new != old:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(new)
        print(f"{path}: performance section {'updated' if new != old else 'unchanged'}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
