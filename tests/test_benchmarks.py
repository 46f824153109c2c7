"""Smoke runs of the benchmark scripts: each writes well-formed results (json + md + png) into a tmp --out.

No timing assertions: the numbers of a smoke run mean nothing; the files, their fields and the README generator do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of scripts at the repo root, not an installed package
    sys.path.insert(0, str(REPO))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_trio(out: Path, name: str) -> dict:
    """results.json (benchmark, config, environment, results), results.md (title, machine, a table), results.png."""
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == name
    env = data["environment"]
    assert env["machine"] and env["cores"] >= 1 and env["python"]
    assert "numpy" in env["versions"] and "torch" in env["versions"]
    assert isinstance(data["config"], dict) and data["results"]
    md = (out / "results.md").read_text()
    assert md.startswith(f"# {name}\n") and "Machine: " in md and "\n|---" in md
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    return data


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    """<root>/<machine>/<benchmark>/: the layout benchmarks/results has; smoke runs write into it."""
    return tmp_path_factory.mktemp("bench-results")


@pytest.fixture(scope="module")
def latency_out(results_root) -> Path:
    from benchmarks import model_latency

    out = results_root / "cpu-test-machine" / "model_latency"
    work = results_root.parent / "latency-work"
    assert model_latency.main(["--smoke", "--out", str(out), "--work", str(work)]) == 0
    return out


@pytest.fixture(scope="module")
def accuracy_out(results_root) -> Path:
    from benchmarks import accuracy

    out = results_root / "cpu-test-machine" / "accuracy"
    assert accuracy.main(["--smoke", "--out", str(out)]) == 0
    return out


def test_model_latency_smoke(latency_out):
    data = _check_trio(latency_out, "model_latency")
    res = data["results"]
    rows = res["rows"]
    models = {r["model"] for r in rows}
    assert len(models) == 2  # the demo model and the big model (ResNet-10 at 32 px in smoke mode)
    for r in rows:
        assert r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] and r["p99_ms"] >= r["p90_ms"]
        assert r["img_per_s"] > 0 and r["iters"] >= 2 and r["batch"] in (1, 4)
    big = next(m for m in models if not m.startswith("demo"))
    assert {(r["head"], r["backend"]) for r in rows if r["model"] == big} == {
        (h, b) for h in ("joint", "tau_norm") for b in ("pytorch-eager-cpu", "onnxruntime-cpu")}
    # folding costs no node: the folded head's graph is the joint head's, op for op
    joint, folded = res["nodes"][f"{big}/joint"], res["nodes"][f"{big}/tau_norm"]
    assert joint["nodes"] == folded["nodes"] and joint["op_counts"] == folded["op_counts"]
    assert joint["op_counts"].get("Gemm") == 1
    goals = {g["goal"]: g for g in res["goals"]}
    assert any("identical ONNX node count" in g and v["met"] is True for g, v in goals.items())
    assert any("folded (tau_norm) / joint" in g for g in goals)
    assert all(set(g) == {"goal", "target", "measured", "met"} for g in res["goals"])
    assert {q["batch"] for q in res["fold_ratios"]} == {1, 4}
    assert "## Goals" in (latency_out / "results.md").read_text()


def test_model_latency_packages_are_valid_and_reused(results_root, latency_out):
    from ltserve.package import load_package

    packages = sorted((results_root.parent / "latency-work" / "models").iterdir())
    assert len(packages) == 3
    for pkg in packages:
        meta = load_package(pkg)  # sha256 of model.onnx and model.pt2 verified
        assert set(meta.files) == {"model.onnx", "model.pt2"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.model_latency", "--smoke", "--no-demo",
                          "--build-only", "--work", str(results_root.parent / "latency-work")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("reused") == 2


def test_accuracy_smoke(accuracy_out):
    from ltserve.heads import HEADS

    data = _check_trio(accuracy_out, "accuracy")
    rows, runs = data["results"]["rows"], data["results"]["runs"]
    assert len(runs) == 1 and runs[0]["seed"] == 0 and runs[0]["train_images"] > 0
    assert [r["head"] for r in rows] == [h for h in HEADS.names() if h in {r["head"] for r in rows}]
    assert {"joint", "crt", "tau_norm", "lws", "ncm"} <= {r["head"] for r in rows}
    for r in rows:
        assert r["seeds"] == 1 and 0.0 <= r["top1_mean"] <= 100.0 and r["top1_std"] == 0.0
        for key in ("many", "medium", "few"):
            assert r[f"{key}_mean"] is None or 0.0 <= r[f"{key}_mean"] <= 100.0


@pytest.fixture(scope="module")
def accuracy_int8_out(results_root) -> Path:
    from benchmarks import accuracy

    out = results_root / "cpu-test-machine" / "accuracy_int8"
    assert accuracy.main(["--smoke", "--int8", "best", "--out", str(out)]) == 0
    return out


def test_accuracy_int8_smoke(accuracy_int8_out):
    data = _check_trio(accuracy_int8_out, "accuracy_int8")
    res = data["results"]
    (row,) = res["per_seed"]
    assert row["seed"] == 0 and row["head"] in {h["head"] for h in res["heads"]}
    assert row["export"] == "refused" or row["export"].startswith("attempt ")
    if row["export"] != "refused":  # both packages evaluated on the whole test split
        assert 0.0 <= row["Few int8"] <= 100.0 and row["dAll"] == pytest.approx(row["All int8"] - row["All fp32"])
        assert 0.0 <= row["agreement"] <= 1.0
    goals = {g["goal"].split(" accuracy")[0]: g for g in res["goals"]}
    assert set(goals) == {"Few", "All"}
    assert "seed 0" in goals["Few"]["measured"] or row["export"] == "refused"
    assert data["config"]["heads"] == "best"


def test_model_latency_int8_smoke(tmp_path):
    from benchmarks import model_latency

    out, work = tmp_path / "out", tmp_path / "work"
    assert model_latency.main(["--smoke", "--no-demo", "--heads", "joint", "--precisions", "fp32,int8",
                               "--batches", "1,8", "--out", str(out), "--work", str(work)]) == 0
    res = _check_trio(out, "model_latency_int8")["results"]
    backends = {r["backend"] for r in res["rows"]}
    assert backends == {"pytorch-eager-cpu", "onnxruntime-cpu", "onnxruntime-cpu-int8"}
    assert {(q["batch"], q["head"]) for q in res["int8_ratios"]} == {(1, "joint"), (8, "joint")}
    assert all(q["vs_fp32"] > 0 and q["vs_eager"] > 0 for q in res["int8_ratios"])
    goals = [g["goal"] for g in res["goals"]]
    assert any("int8 vs ONNX Runtime fp32 at batch 8" in g for g in goals)
    assert any("int8 vs PyTorch eager at batch 1" in g for g in goals)
    int8_rows = [r for r in res["rows"] if r["backend"] == "onnxruntime-cpu-int8"]
    assert all(r["vs"] == "onnxruntime-cpu" for r in int8_rows)  # agreement measured against fp32
    from ltserve.package import load_package

    assert load_package(work / "models" / "resnet10-32px-10c-joint-int8").graph.precision == "int8"


def test_int8_placement_speed_smoke_and_summary(tmp_path):
    from benchmarks import int8_placement

    out = tmp_path / "out"
    assert int8_placement.main(["--smoke", "--part", "speed", "--out", str(out)]) == 0
    res = _check_trio(out, "int8_placement")["results"]
    assert {r["variant"] for r in res["speed"]} == {"fp32", *int8_placement.VARIANTS}
    assert all(r["speedup_vs_fp32"] > 0 for r in res["speed"])
    acc = [{"variant": "stem float", "weight_bits": b, "agreement": 0.99, "dMany": 0.0, "dMedium": 0.0,
            "dFew": few, "dAll": -0.1} for b, few in ((7, -0.5), (7, 0.3), (8, 0.1))]
    speed = [{"variant": "stem float", "batch": 8, "speedup_vs_fp32": 2.5}]
    rows = {r["weight_bits"]: r for r in int8_placement.summarise(acc, speed)}
    assert rows[7]["mean dFew"] == pytest.approx(-0.1) and rows[7]["worst dFew"] == -0.5 and rows[7]["cases"] == 2
    assert rows[8]["speed-up b8"] == rows[7]["speed-up b8"] == 2.5  # the same kernels whatever the weight bits
    # a later --part accuracy keeps this speed part, saying when and under which load it was measured
    earlier = int8_placement.earlier_part(out, "accuracy")
    assert earlier["part"] == "speed" and earlier["speed"] == res["speed"] and earlier["load"]
    assert int8_placement.earlier_part(out, "speed") == {} and int8_placement.earlier_part(out, "both") == {}


def test_serve_load_int8_goal_compares_the_same_run():
    from benchmarks.serve_load import int8_goals

    def res(*sweeps: float) -> dict:
        runs = [{"req_s": r} for r in sweeps]
        return {"http": {"inprocess/batched": [{"concurrency": 1, "req_s": 1.0, "p50": 1.0, "runs": runs},
                                               {"concurrency": 16, "req_s": sorted(sweeps)[len(sweeps) // 2],
                                                "p50": 300.0, "runs": runs}]}}

    # paired within each sweep: 80/40, 60/20, 50/50 -> median 2.0, not the ratio of the medians (60/40)
    (goal,) = int8_goals({"tiny": res(1.0), "resnet18": res(40.0, 20.0, 50.0), "resnet18-int8": res(80.0, 60.0, 50.0)})
    assert goal["met"] is True and goal["paired_ratios"] == [2.0, 3.0, 1.0]
    assert goal["measured"].startswith("2.00x (median of 3 sweeps: 2.00, 3.00, 1.00")
    assert int8_goals({"resnet18": res(40.0), "resnet18-int8": res(60.0)})[0]["met"] is False
    assert int8_goals({"resnet18": res(40.0)}) == []


def test_sampler_ablation_smoke(tmp_path):
    """Two stage-1 samplers end to end; each run really trained with its sampler; the finding names every head."""
    from benchmarks import sampler_ablation

    out = tmp_path / "sampler_ablation"
    assert sampler_ablation.main(["--smoke", "--out", str(out)]) == 0
    data = _check_trio(out, "sampler_ablation")
    res = data["results"]
    assert [(r["setting"], r["seed"]) for r in res["runs"]] == [("IB", 0), ("CB", 0)]
    assert all(f"train.sampler={s}" in r["overrides"] for r, s in zip(res["runs"], ("ib", "cb")))
    # the two representations differ, so the heads fitted on them do too
    assert res["runs"][0]["heads"]["joint"] != res["runs"][1]["heads"]["joint"]
    decoupled = {r["head"] for r in res["rows"]} - {"joint"}
    assert set(res["finding"]["best"]) == decoupled and set(res["finding"]["best"].values()) <= {"IB", "CB"}
    goal = res["goals"][0]
    assert goal["met"] == (len(res["finding"]["ib_best"]) == len(decoupled))
    assert f"/{len(decoupled)} heads" in goal["measured"]


def test_decode_smoke(tmp_path):
    """Exact vs draft decoding on a few photos: every file is large enough for draft at 32 px, few are at 224 px,
    draft changes the pixels a little, and the process gets its cores back."""
    from benchmarks import decode

    cores = os.sched_getaffinity(0)
    out = tmp_path / "decode"
    assert decode.main(["--smoke", "--out", str(out), "--sizes", "32,224"]) == 0
    assert os.sched_getaffinity(0) == cores
    res = _check_trio(out, "decode")["results"]
    assert [r["size"] for r in res] == [32, 224] and all(r["images"] == 12 for r in res)
    assert res[0]["affected_share"] == 1.0 > res[1]["affected_share"]  # shorter sides 256-640 px vs 2 x 256
    assert 0.0 < res[0]["mean_abs_levels"] < 8.0 and res[0]["exact_img_s"] > 0 and res[0]["draft_img_s"] > 0


def test_soak_smoke(tmp_path):
    """A few seconds of the mixed soak load on a real server: every answer as expected, memory sampled."""
    from benchmarks import soak

    out = tmp_path / "soak"
    assert soak.main(["--smoke", "--out", str(out)]) == 0
    res = _check_trio(out, "soak")["results"]
    assert res["requests"] > 100 and res["errors"] == 0, res["first_errors"]
    kinds = {k.split()[0] for k in res["statuses"]}
    assert {"png", "batch4", "truncated_jpeg", "over_pixel_cap", "unknown_path", "wrong_type"} <= kinds
    assert len(res["memory"]) >= 3 and all(s["rss_mb"] > 0 for s in res["memory"])
    assert {p["name"] for p in res["memory"][0]["processes"]} == {"supervisor", "worker"}
    assert res["server"]["workers"] == 2


def test_abuse_smoke(tmp_path):
    """Every abuse scenario at a small size: the goal table has a line per finding, each within its goal."""
    from benchmarks import abuse

    out = tmp_path / "abuse"
    assert abuse.main(["--smoke", "--out", str(out)]) == 0
    res = _check_trio(out, "abuse")["results"]
    assert set(res) == {"decode_flood", "unknown_paths", "half_sent", "kill_worker", "parent_kill"}
    assert res["decode_flood"]["over_budget"]["normal"]["errors"] == 0
    assert res["unknown_paths"]["statuses"] == {"404": 200}
    assert res["half_sent"]["still_open_after_deadline"] == 0 and res["half_sent"]["probe_failures"] == 0
    assert res["kill_worker"]["health_failures"] == 0
    assert res["parent_kill"]["still_running"] == 0
    assert (out / "results.md").read_text().count("\n| ") >= 6  # header + a line per finding


def test_sampler_ablation_rejects_an_unknown_sampler(tmp_path):
    from benchmarks import sampler_ablation
    from ltserve.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown xb \(valid: ib, cb, sr, pb\)"):
        sampler_ablation.main(["--smoke", "--samplers", "ib,xb", "--out", str(tmp_path)])


def test_accuracy_plan_defaults():
    from benchmarks.accuracy import build_parser, plan

    config, settings, seeds = plan(build_parser().parse_args([]))
    assert config.name == "fashion_lt.yaml" and seeds == [0, 1, 2]
    assert [s[1][:2] for s in settings] == [["data.longtail.rho=100", "data.longtail.n_max=1000"],
                                            ["data.longtail.rho=50", "data.longtail.n_max=500"]]
    assert all("train.epochs=30" in s[1] for s in settings)
    config, settings, _ = plan(build_parser().parse_args(["--config", "configs/x.yaml", "--data", "/d"]))
    assert settings == [("x on /d", ["data.root=/d"])]


def test_perf_readme_section_from_smoke_results(results_root, latency_out, accuracy_out, accuracy_int8_out,
                                                tmp_path):
    """The full section goes to docs/performance.md, the goals summary between the README's perf-summary markers;
    the text around both is kept, and --check sees a hand edit in either."""
    from benchmarks import perf_readme

    readme, doc = tmp_path / "README.md", tmp_path / "docs" / "performance.md"
    original = (f"# ltserve\n\nIntro.\n\n## Performance\n\n{perf_readme.SUMMARY_START}\nstale\n"
                f"{perf_readme.SUMMARY_END}\n\n## Limits\n")
    readme.write_text(original)
    args = ["--results", str(results_root), "--readme", str(readme)]
    assert perf_readme.main(args) == 0
    page = doc.read_text()  # created, with its title and the markers
    assert page.startswith("# Performance\n")
    head, rest = page.split(perf_readme.START, 1)
    section = rest.split(perf_readme.END, 1)[0]
    assert "generated by `python -m benchmarks.perf_readme`" in section
    assert "### Goals" in section and "identical ONNX node count" in section
    assert "### model_latency on " in section and "### accuracy on " in section
    assert "### accuracy_int8 on " in section and "Few accuracy, int8 vs fp32 package" in section
    assert section.count("[`cpu-test-machine`]") >= 3  # every figure names its machine
    assert "onnxruntime-cpu" in section and "tau_norm" in section
    text = readme.read_text()
    before, rest = text.split(perf_readme.SUMMARY_START, 1)
    summary, after = rest.split(perf_readme.SUMMARY_END, 1)
    assert before == original.split(perf_readme.SUMMARY_START, 1)[0]
    assert after == original.split(perf_readme.SUMMARY_END, 1)[1]
    assert "stale" not in summary and "docs/performance.md" in summary
    assert "| model_latency | " in summary and "[`cpu-test-machine`]" in summary and " of " in summary
    assert len(summary.strip().splitlines()) <= 20  # a summary, not the tables
    assert perf_readme.main(args + ["--check"]) == 0
    doc.write_text(page.replace("onnxruntime-cpu", "edited by hand", 1))
    assert perf_readme.main(args + ["--check"]) == 1
    doc.write_text(page + "\nNotes below the generated section stay.\n")
    readme.write_text(text.replace("| model_latency | ", "| edited | ", 1))
    assert perf_readme.main(args + ["--check"]) == 1
    assert perf_readme.main(args) == 0 and readme.read_text() == text
    assert doc.read_text().endswith("Notes below the generated section stay.\n")
    # smoke folders are left out unless asked for
    shutil.copytree(results_root / "cpu-test-machine", results_root / "other-smoke")
    assert perf_readme.main(args) == 0
    assert "other-smoke" not in readme.read_text() and "other-smoke" not in doc.read_text()


def test_perf_readme_labels_device_preprocess_goals_measured_without_a_gpu():
    from benchmarks.perf_readme import STAND_IN, goals_of

    goals = {"goals": [{"goal": "photos: top-1 agreement", "target": ">= 99.5%", "measured": "100%", "met": True}]}
    cpu = {"benchmark": "gpu_preprocess_check", "environment": {"cpu": "x", "cores": 2}, "results": goals}
    gpu = {**cpu, "environment": {"cpu": "x", "cores": 16, "gpu": "NVIDIA H100"}}
    assert goals_of(cpu)[0]["goal"] == STAND_IN + "photos: top-1 agreement"
    assert goals_of(gpu)[0]["goal"] == "photos: top-1 agreement"


def test_perf_readme_appends_markers_when_missing(tmp_path):
    from benchmarks.perf_readme import END, START, splice

    assert splice("# Title\n", f"{START}\nx\n{END}") == f"# Title\n\n## Performance\n\n{START}\nx\n{END}\n"
    assert splice(f"a\n{START}\nold\n{END}\nb\n", f"{START}\nnew\n{END}") == f"a\n{START}\nnew\n{END}\nb\n"


def test_run_all_dry_run_passes_only_known_options(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--dry-run", "--smoke", "--out",
                          str(tmp_path / "m"), "--demo-run", str(tmp_path / "run"), "--work", str(tmp_path / "w")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = {ln.split(":")[0][4:]: ln for ln in out.stdout.splitlines() if ln.startswith("=== ")}
    assert {"accuracy", "model_latency"} <= set(lines)
    assert f"--out {tmp_path / 'm' / 'model_latency'}" in lines["model_latency"]
    assert f"--model {tmp_path / 'run'}" in lines["model_latency"] and "--smoke" in lines["model_latency"]
    assert "--work" in lines["accuracy"] and "--model" not in lines["accuracy"]
    if "serve_load" in lines:  # its --models must not be mistaken for --model
        assert "--model " not in lines["serve_load"]


def test_run_all_rejects_unknown_scripts():
    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--dry-run", "--only", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown script(s) nope" in out.stderr


def test_gpu_run_script_parses():
    for script in ("benchmarks/gpu_run.sh", "benchmarks/gpu/fetch_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True, timeout=30)


def test_gpu_run_cpu_fallback_smoke(tmp_path, results_root, latency_out):
    """The GPU script end to end on CPU with tiny sizes (no wheels install, no server): phases log, results land."""
    (tmp_path / "work").mkdir()
    # the packages the model_latency smoke run built are the ones this run builds: reuse them (seconds saved)
    (tmp_path / "work" / "build").symlink_to(results_root.parent / "latency-work")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "LTSERVE_GPU_WORK": str(tmp_path / "work"), "LTSERVE_CORPUS": str(tmp_path / "corpus")}
    proc = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--cpu", "--smoke", "--skip", "wheels,serve"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "out" / "gpu_run.log").read_text()
    for phase in ("env", "imports", "corpus", "build", "preprocess", "latency", "summary"):
        assert f"-- {phase}: ok" in log, log[-4000:]
    assert "== serve: skipped (--skip)" in log
    data = _check_trio(tmp_path / "out" / "model_latency", "model_latency")
    assert data["config"]["batches"] == [1, 4]
    check = _check_trio(tmp_path / "out" / "gpu_preprocess_check", "gpu_preprocess_check")
    assert {r["data"] for r in check["results"]["rows"]} == {"photos", "fashion_png"}
    assert (tmp_path / "corpus" / "manifest.json").is_file()  # made on the spot when none was brought
    assert "identical ONNX node count" in log  # the summary phase printed the goals


def test_prepare_corpus(tmp_path):
    import numpy as np
    from PIL import Image

    from benchmarks.gpu.prepare_corpus import MAX_BYTES, write_corpus

    manifest = write_corpus(tmp_path, n=3, seed=1, fashion_n=5)
    files = manifest["files"]
    assert sum(f["file"].startswith("fashion_png/") for f in files) == 5
    assert set(np.load(tmp_path / "fashion_lsq.npz")) == {"weight", "bias", "spec"}
    assert manifest["bytes"] < MAX_BYTES and manifest["bytes"] == sum(f["bytes"] for f in files)
    for f in files:
        with Image.open(tmp_path / f["file"]) as img:
            assert img.size == (f["width"], f["height"])
            assert img.format == ("PNG" if f["file"].startswith("fashion_png/") else "JPEG")
    assert {f["file"].split("/")[0] for f in files} >= {"photo_500x375", "photo_224"}
    again = write_corpus(tmp_path, n=3, seed=1, fashion_n=5)
    assert [f["bytes"] for f in again["files"]] == [f["bytes"] for f in files]  # seeded


def test_gpu_service_goal_compares_with_the_decode_ceiling_of_the_same_run():
    """Half the all-cores decode ceiling is the bar; a run that did not measure the ceiling says so."""
    from benchmarks.perf_readme import gpu_service_goal

    def run(req_s: list[float], ceiling: float | None) -> dict:
        inproc = {"ceiling_img_s": 50.0, **({"cpu_decode_img_s": ceiling} if ceiling else {})}
        return {"in_process": inproc, "http": {"inprocess/batched": [{"req_s": r} for r in req_s]}}

    met = gpu_service_goal({"m": run([100.0, 600.0], 1000.0)})
    assert met["met"] is True and "600 req/s = 60 % of 1,000 img/s" in met["measured"]
    missed = gpu_service_goal({"m": run([100.0, 400.0], 1000.0)})
    assert missed["met"] is False and "40 %" in missed["measured"]
    unmeasured = gpu_service_goal({"m": run([400.0], None)})
    assert unmeasured["met"] is None and "not measured" in unmeasured["measured"]
    assert gpu_service_goal({"note": "no models"}) is None


def test_each_run_prints_one_line_per_run_when_not_a_terminal(capsys):
    """In CI and log files a benchmark's runs are announced one line each, not as a redrawn progress bar."""
    from benchmarks.common import each_run

    assert list(each_run([("ib", 0), ("cb", 1)], "ablation runs")) == [("ib", 0), ("cb", 1)]
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("ablation runs: 1/2 ('ib', 0)")
    assert out.splitlines()[1].startswith("ablation runs: 2/2 ('cb', 1)")
    assert "\r" not in err  # no bar redrawn
