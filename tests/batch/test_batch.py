"""ltserve predict (ltserve.batch, ltserve.cli.predict): real Fashion-MNIST PNGs, a real ONNX package, the real CLI.

The package is a ridge least-squares Gemm fitted on Fashion-MNIST (tests/package_helpers.py), so predictions and
accuracies mean something; the CLI runs as a subprocess (`python -m ltserve.cli predict`), killed with SIGKILL /
SIGINT where resuming is tested.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.batch.decode import DecodePool, decode_files, stop_processes
from ltserve.batch.inputs import expand_inputs, read_list_file
from ltserve.batch.job import run_predict
from ltserve.batch.options import PredictOptions, resolve_format
from ltserve.batch.sinks import CsvSink, JsonlSink, _truncate_torn_tail
from ltserve.errors import ConfigError, DataError, LtserveError, PackageError
from package_helpers import build_lsq_package, read_fashion

REPO = Path(__file__).resolve().parents[2]
N_GOOD = 300
MAX_PIXELS = 100_000  # so that a 400x400 PNG is "over the pixel limit" without writing a huge file


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_lsq_package(tmp_path_factory.mktemp("models") / "fashion-lsq")


@pytest.fixture(scope="module")
def fashion_test():
    return read_fashion("t10k")


def _write_pngs(folder: Path, images: np.ndarray, start: int, n: int, nested: bool) -> list[str]:
    rels = []
    for i in range(start, start + n):
        rel = f"class{i % 3}/{i:05d}.png" if nested else f"{i:05d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / rel)
        rels.append(rel)
    return rels


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, fashion_test):
    """N_GOOD Fashion-MNIST test PNGs in sub-folders, a list file with their labels, and every kind of bad file."""
    images, labels = fashion_test
    root = tmp_path_factory.mktemp("images")
    good = _write_pngs(root, images, 0, N_GOOD, nested=True)
    png = (root / good[0]).read_bytes()
    bad = {
        "bad/truncated.png": ("InvalidImage", png[: len(png) // 2]),
        "bad/corrupt.png": ("InvalidImage", png[:40] + bytes(range(256)) * 2),
        "bad/notes.txt": ("InvalidImage", b"not an image at all\n"),
        "bad/empty.jpg": ("InvalidImage", b""),
        "bad/scan.tif": ("InvalidImage", b"II*\x00" + b"\x00" * 64),  # a TIFF header and nothing after it
        "bad/layers.psd": ("UnsupportedFormat", b"8BPS\x00\x01" + b"\x00" * 64),
    }
    for rel, (_, data) in bad.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    Image.new("L", (400, 400), 128).save(root / "bad/huge.png")
    bad["bad/huge.png"] = ("ImageTooLarge", b"")
    os.symlink(root / "does-not-exist.png", root / "bad/dangling.png")  # unreadable, even for root
    bad["bad/dangling.png"] = ("Unreadable", b"")
    os.mkfifo(root / "bad/pipe.png")  # opening it would block a decode worker until something writes to it
    bad["bad/pipe.png"] = ("Unreadable", b"")
    (root / ".hidden.png").write_bytes(png)  # hidden files are not inputs
    listing = root.parent / f"{root.name}-list.txt"
    listing.write_text("".join(f"{rel} {labels[i]}\n" for i, rel in enumerate(good)))
    return {"root": root, "good": [str(root / r) for r in good], "good_rel": good, "labels": labels[:N_GOOD],
            "bad": {str(root / r): kind for r, (kind, _) in bad.items()}, "list": listing}


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory, fashion_test) -> Path:
    """2000 PNGs: enough work at --batch-size 8 to be stopped midway."""
    root = tmp_path_factory.mktemp("big")
    _write_pngs(root, fashion_test[0], 0, 2000, nested=False)
    return root


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltserve.cli", "predict", *map(str, args), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str) -> subprocess.Popen:
    # its own session, so that a signal reaches the CLI and its decode workers together (like Ctrl-C in a shell)
    # SIGINT back to its default: a test runner started in the background (CI, nohup ... &) has it ignored, and a
    # Python started with SIGINT ignored never turns Ctrl-C into KeyboardInterrupt
    # -X faulthandler: SIGABRT makes it print every thread's stack, which `communicate_or_dump` reports on a hang
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "ltserve.cli", "predict", *map(str, args),
                             "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def communicate_or_dump(proc: subprocess.Popen, timeout: float) -> tuple[bytes, bytes]:
    """`proc.communicate(timeout)`; if it has not exited by then, fail with the stack of each of its threads."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)
        _, stderr = proc.communicate(timeout=30)
        os.killpg(proc.pid, signal.SIGKILL)  # its decode workers too
        pytest.fail(f"still running {timeout:.0f} s later; its threads:\n{stderr.decode(errors='replace')[-8000:]}")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited (its reaper, the killed parent, is gone)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_parquet_dir(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # the dev extra installs pyarrow
    return pq.read_table(path).to_pylist()


def by_path(rows: list[dict]) -> dict[str, dict]:
    out = {r["path"]: r for r in rows}
    assert len(out) == len(rows), "duplicate rows"
    return out


def assert_same_predictions(rows: dict[str, dict], ref: dict[str, dict]) -> None:
    assert set(rows) == set(ref)
    for path, r in rows.items():
        assert r["class_index"] == ref[path]["class_index"], path
        assert r["label"] == ref[path]["label"]
        assert r["shot_group"] == ref[path]["shot_group"]
        assert r["probability"] == pytest.approx(ref[path]["probability"], abs=1e-5)
        assert [e["class_index"] for e in r["top_k"]] == [e["class_index"] for e in ref[path]["top_k"]]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, package, image_dir):
    """One real CLI run over the folder of good and bad files (shared by several tests)."""
    out = tmp_path_factory.mktemp("out") / "preds.jsonl"
    proc = run_cli(package, image_dir["root"], "--out", out, "--batch-size", 16, "--workers", 2,
                   "--max-pixels", MAX_PIXELS, "--top-k", 3, "--json", out.with_suffix(".summary.json"))
    return {"proc": proc, "out": out, "errors": Path(f"{out}.errors.jsonl"),
            "summary": json.loads(out.with_suffix(".summary.json").read_text())}


# ---------------------------------------------------------------------------------------------------------------------
# the local engine end to end
# ---------------------------------------------------------------------------------------------------------------------


def test_folder_predictions_match_the_predictor_alone_and_bad_files_are_listed(folder_run, package, image_dir):
    from ltserve.runtime import Predictor
    from ltserve.preprocess import decode

    proc = folder_run["proc"]
    assert proc.returncode == 1, proc.stderr  # some files failed
    rows = by_path(read_jsonl(folder_run["out"]))
    assert set(rows) == set(image_dir["good"])
    predictor = Predictor(package, threads=1, max_batch_size=1)
    for path, row in rows.items():
        alone = predictor.classify([decode(Path(path).read_bytes(), predictor.spec)], top_k=3)[0]
        assert row["class_index"] == alone.class_index and row["label"] == alone.label, path
        assert row["probability"] == pytest.approx(alone.probability, abs=1e-5)
        assert [e["class_index"] for e in row["top_k"]] == [e.class_index for e in alone.top_k]
        assert row["shot_group"] == alone.shot_group
        assert "true_label" not in row  # no labels in folder mode

    errors = by_path(read_jsonl(folder_run["errors"]))
    assert {p: e["error"] for p, e in errors.items()} == image_dir["bad"]
    assert all(e["reason"] for e in errors.values())
    assert not any(".hidden" in p for p in [*rows, *errors])

    s = folder_run["summary"]
    assert (s["files"], s["predicted"], s["failed"]) == (N_GOOD + len(image_dir["bad"]), N_GOOD, len(image_dir["bad"]))
    assert sum(s["shot_groups"].values()) == N_GOOD
    assert s["shot_groups"]["many"] == sum(r["shot_group"] == "many" for r in rows.values())
    assert s["images_per_s"] > 0 and s["accuracy"] is None
    assert f"{N_GOOD} predicted, {len(image_dir['bad'])} failed" in proc.stdout
    assert "images/s" in proc.stdout and "predictions by shot group" in proc.stdout


def test_folder_of_tiff_and_pnm_predicts_like_png(tmp_path, package, fashion_test):
    """`ltserve predict` over .tif/.tiff/.pgm/.pbm files: the predictions of the same images sent as PNG."""
    from ltserve.runtime import Predictor

    images, _ = fashion_test
    folder, pngs = tmp_path / "scans", []
    for i in range(24):
        ext = (".tif", ".tiff", ".pgm", ".ppm")[i % 4]
        img = Image.fromarray(images[i]).convert("RGB" if ext == ".ppm" else "L")
        folder.mkdir(exist_ok=True)
        img.save(folder / f"{i:05d}{ext}", format="TIFF" if ext.startswith(".tif") else "PPM",
                 **({"compression": "tiff_lzw"} if ext == ".tiff" else {}))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    out = tmp_path / "preds.jsonl"
    proc = run_cli(package, folder, "--out", out, "--top-k", 3, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out)
    assert [Path(r["path"]).stem for r in rows] == [f"{i:05d}" for i in range(24)]
    expected = Predictor(package, threads=1).classify_bytes(pngs, top_k=3)
    for row, want in zip(rows, expected):
        assert row["class_index"] == want.class_index, row["path"]
        assert row["probability"] == pytest.approx(want.probability, abs=1e-6)


def test_sigkill_midway_then_resume_equals_an_uninterrupted_run(tmp_path, package, big_dir):
    common = ["--batch-size", 8, "--workers", 1]
    ref_out = tmp_path / "ref.jsonl"
    assert run_cli(package, big_dir, *common, "--out", ref_out).returncode == 0
    ref = by_path(read_jsonl(ref_out))
    assert len(ref) == 2000

    out = tmp_path / "killed.jsonl"
    proc = start_cli(package, big_dir, *common, "--out", out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > 20_000:  # some dozens of rows written
            break
        time.sleep(0.002)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the main process alone, as the OOM killer would: workers must follow it
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lines_at_kill = out.read_bytes().count(b"\n")
    assert workers, "the decode workers had not started"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    if survivors:  # do not leave them behind, then fail
        os.killpg(proc.pid, signal.SIGKILL)
    assert not survivors, "decode workers outlived their main process"
    assert 0 < lines_at_kill < 2000, "the run was not stopped midway"
    with open(out, "ab") as f:  # whatever the kill left, also leave a torn last line, as a kill inside write() does
        f.write(b'{"path": "' + str(big_dir).encode() + b'/00001.png", "label": "Tro')

    proc2 = run_cli(package, big_dir, *common, "--out", out, "--resume", "--json", tmp_path / "s.json")
    assert proc2.returncode == 0, proc2.stderr
    assert "half-written last line" in proc2.stderr
    rows = read_jsonl(out)  # every line parses: the torn one was cut off
    assert len(rows) == 2000
    assert_same_predictions(by_path(rows), ref)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] >= lines_at_kill - 1 and summary["predicted"] == 2000
    assert summary["new_rows"] == 2000 - summary["resumed"]


def test_ctrl_c_on_parquet_then_resume(tmp_path, package, big_dir):
    # small batches and parts: the run lasts seconds, so the stop lands midway even on a fast, idle machine
    common = ["--batch-size", 2, "--workers", 1, "--part-rows", 16]
    out = tmp_path / "preds.parquet"
    proc = start_cli(package, big_dir, *common, "--out", out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and len(list(out.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = communicate_or_dump(proc, 60)
    assert proc.returncode == 130, stderr
    assert b"--resume" in stderr and stderr.count(b"interrupted") == 1  # one message, not one per layer
    parts_at_stop = list(out.glob("part-*.parquet"))
    assert not list(out.glob(".part-*"))  # nothing half-written is left
    n_at_stop = len(read_parquet_dir(out))
    assert 0 < n_at_stop < 2000

    proc2 = run_cli(package, big_dir, *common, "--out", out, "--resume")
    assert proc2.returncode == 0, proc2.stderr
    rows = by_path(read_parquet_dir(out))
    assert set(rows) == {str(big_dir / f"{i:05d}.png") for i in range(2000)}
    assert len(list(out.glob("part-*.parquet"))) > len(parts_at_stop)


def test_list_mode_accuracy_matches_ltserve_evaluate(tmp_path, package, image_dir):
    out = tmp_path / "list.csv"
    proc = run_cli(package, image_dir["list"], "--root", image_dir["root"], "--out", out,
                   "--json", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    acc = json.loads((tmp_path / "s.json").read_text())["accuracy"]
    assert acc["n"] == N_GOOD
    assert "accuracy on 300 labelled images: top-1" in proc.stdout

    ev = subprocess.run([sys.executable, "-m", "ltserve.cli", "evaluate", str(package), "--data",
                         str(image_dir["list"]), "--root", str(image_dir["root"]), "--out", str(tmp_path / "ev.json")],
                        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert ev.returncode == 0, ev.stderr
    report = json.loads((tmp_path / "ev.json").read_text())
    assert abs(acc["top1"] - report["top1"]) <= 0.001
    for group in ("many", "medium", "few"):
        assert (acc[group] is None) == (report[group] is None)
        if acc[group] is not None:
            assert abs(acc[group] - report[group]) <= 0.001, group

    # rows carry the list's path (relative, as written) and its label, mapped through the package's classes
    import csv

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    from package_helpers import FASHION_LABELS

    assert [r["path"] for r in rows] == image_dir["good_rel"]
    assert [int(r["true_class_index"]) for r in rows] == list(image_dir["labels"])
    assert all(r["true_label"] == FASHION_LABELS[int(r["true_class_index"])] for r in rows)
    correct = np.mean([r["class_index"] == r["true_class_index"] for r in rows])
    assert correct == pytest.approx(acc["top1"])
    assert 0.6 < acc["top1"] < 1.0  # the least-squares model is ~80 % accurate: predictions mean something


def test_ray_engine_gives_the_same_predictions_as_local(tmp_path, package, image_dir, folder_run):
    out = tmp_path / "ray.parquet"
    proc = run_cli(package, image_dir["root"], "--out", out, "--engine", "ray", "--ray-num-cpus", 2,
                   "--workers", 2, "--concurrency", 1, "--batch-size", 16, "--max-pixels", MAX_PIXELS, "--top-k", 3,
                   timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the bad files failed, as in the local run
    rows = by_path(read_parquet_dir(out))
    assert_same_predictions(rows, by_path(read_jsonl(folder_run["out"])))
    errors = by_path(read_jsonl(Path(f"{out}.errors.jsonl")))
    assert {p: e["error"] for p, e in errors.items()} == image_dir["bad"]


# ---------------------------------------------------------------------------------------------------------------------
# failing fast
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_model_fails_fast_naming_the_path(tmp_path, image_dir):
    missing = tmp_path / "models" / "nope"
    out = tmp_path / "preds.jsonl"
    proc = run_cli(missing, image_dir["root"], "--out", out)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_unwritable_output_fails_fast_naming_the_path(tmp_path, package, image_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "preds.jsonl"  # a folder that cannot exist: unwritable even for root
    proc = run_cli(package, image_dir["root"], "--out", out)
    assert proc.returncode == 2
    assert str(out) in proc.stderr and "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_existing_output_needs_resume_or_overwrite(tmp_path, package, image_dir):
    out = tmp_path / "preds.jsonl"
    opts = PredictOptions(inputs=image_dir["good"][:5], model=package, out=out, workers=0, progress=False)
    assert run_predict(opts)["predicted"] == 5
    with pytest.raises(ConfigError, match="--resume"):
        run_predict(opts)
    opts.overwrite = True
    assert run_predict(opts)["new_rows"] == 5
    assert len(read_jsonl(out)) == 5
    opts.overwrite, opts.resume = False, True
    s = run_predict(opts)
    assert (s["new_rows"], s["resumed"], s["predicted"]) == (0, 5, 5)


def test_option_errors(tmp_path, package, image_dir):
    with pytest.raises(ConfigError, match="suffix"):
        resolve_format(tmp_path / "out.xyz", None)
    assert resolve_format(tmp_path / "out.xyz", "csv") == "csv"
    assert resolve_format(tmp_path / "out.parquet", None) == "parquet"
    with pytest.raises(ConfigError, match="batch-size"):
        run_predict(PredictOptions(inputs=[str(image_dir["root"])], model=package, out=tmp_path / "o.jsonl",
                                   batch_size=0))
    with pytest.raises(PackageError):
        run_predict(PredictOptions(inputs=[str(image_dir["root"])], model=tmp_path, out=tmp_path / "o.jsonl"))


# ---------------------------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------------------------


def test_expand_inputs_folders_globs_lists(tmp_path, image_dir):
    from package_helpers import FASHION_LABELS

    root = image_dir["root"]
    items = expand_inputs([str(root)], FASHION_LABELS)
    assert {it.key for it in items} == set(image_dir["good"]) | set(image_dir["bad"])
    assert [it.key for it in items] == sorted(it.key for it in items)  # deterministic order
    globbed = expand_inputs([f"{root}/class1/*.png", f"{root}/**/*.png"], FASHION_LABELS)
    assert len(globbed) == len({it.key for it in globbed})  # named twice, kept once
    assert {it.key for it in globbed} == {p for p in [*image_dir["good"], *image_dir["bad"]] if p.endswith(".png")}
    # the run's own output inside an input folder is never an input
    assert str(root / "bad/notes.txt") not in {it.key for it in expand_inputs([str(root)], FASHION_LABELS,
                                                                              exclude=[root / "bad/notes.txt"])}
    with pytest.raises(ConfigError, match="no such file"):
        expand_inputs([str(tmp_path / "missing")], FASHION_LABELS)
    with pytest.raises(ConfigError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.png")], FASHION_LABELS)

    listing = tmp_path / "mixed.txt"
    listing.write_text("# comment\n\na.png 3\nsub dir/b c.png\nd.png\tAnkle boot\ne.png Bag\n")
    items = read_list_file(listing, FASHION_LABELS, root=None)
    assert [(it.key, it.label) for it in items] == [("a.png", 3), ("sub dir/b c.png", None), ("d.png", 9),
                                                    ("e.png", 8)]
    assert items[0].file == str(tmp_path / "a.png")
    assert read_list_file(listing, FASHION_LABELS, root="/data")[0].file == "/data/a.png"
    listing.write_text("a.png 3\nb.png 10\n")
    with pytest.raises(DataError, match=r"mixed.txt:2: label 10"):
        read_list_file(listing, FASHION_LABELS)
    listing.write_text("a.png\tShoe\n")
    with pytest.raises(DataError, match="Shoe"):
        read_list_file(listing, FASHION_LABELS)


def test_decode_pool_in_spawned_workers_equals_decoding_inline(package, image_dir):
    from ltserve.package import load_package

    spec = load_package(package).preprocess
    files = image_dir["good"][:40] + sorted(image_dir["bad"])
    inline = decode_files(files, spec, MAX_PIXELS)
    with DecodePool(files, spec, workers=2, chunk_size=7, max_pixels=MAX_PIXELS) as pool:
        chunks = list(pool)
    assert [i for c in chunks for i in c.ok] == inline.ok == list(range(40))
    np.testing.assert_array_equal(np.concatenate([c.images for c in chunks]), inline.images)
    assert inline.images.shape == (40, 28, 28, 1) and inline.images.dtype == np.uint8
    assert [f for c in chunks for f in c.failures] == inline.failures
    assert {files[i]: kind for i, kind, _ in inline.failures} == image_dir["bad"]


def test_torn_tail_is_cut_and_whole_lines_kept(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"path": "a"}\n{"path": "b"}\n{"pa')
    _truncate_torn_tail(path)
    assert path.read_bytes() == b'{"path": "a"}\n{"path": "b"}\n'
    _truncate_torn_tail(path)  # nothing to cut
    assert path.read_bytes().count(b"\n") == 2
    path.write_bytes(b"x" * 100_000)  # no newline at all: a first line killed midway
    _truncate_torn_tail(path)
    assert path.read_bytes() == b""
    path.write_bytes(b'{"path": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2"):
        list(JsonlSink(path).recover())


def test_csv_resume_after_a_torn_write(tmp_path, package, image_dir):
    files = image_dir["good"][:40]
    ref_out, out = tmp_path / "ref.csv", tmp_path / "out.csv"
    run_predict(PredictOptions(inputs=files, model=package, out=ref_out, workers=0, batch_size=8, progress=False))
    ref_text = ref_out.read_text()
    lines = ref_text.splitlines(keepends=True)
    out.write_text("".join(lines[:21]) + lines[21][:30])  # header, 20 rows, and a torn 21st row
    s = run_predict(PredictOptions(inputs=files, model=package, out=out, workers=0, batch_size=8, progress=False,
                                   resume=True))
    assert (s["resumed"], s["new_rows"], s["predicted"]) == (20, 20, 40)
    assert out.read_text() == ref_text  # same rows, same order, header once
    rows = list(CsvSink(out, labelled=False).recover())
    assert [r["path"] for r in rows] == files and all(isinstance(r["class_index"], int) for r in rows)


def test_batch_modules_do_not_import_torch():
    code = ("import sys, ltserve.batch.job, ltserve.batch.ray_engine, ltserve.cli.predict; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_ray_missing_is_a_clear_error(monkeypatch):
    from ltserve.batch import ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when Ray is not installed
    with pytest.raises(LtserveError, match=r"ltserve\[ray\]"):
        ray_engine.require_ray()


def test_benchmark_smoke(tmp_path):
    """benchmarks/batch_predict.py --smoke: the whole script (corpus, package export, four measurements, report)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.batch_predict", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    (r,) = results["results"]
    assert r["model"] == "tiny-28px" and r["images"] == 24
    assert r["samples"]["predict:default"][0]["images"] == 24
    assert all(v > 0 for v in r["ratios"].values())
    assert results["config"]["seed"] == 0 and "onnxruntime" in results["environment"]["versions"]
    assert "ltserve predict" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_stop_processes_waits_for_a_worker_that_leaves_and_kills_one_that_does_not():
    """What a stopped job does with its decode workers: one that exits within the grace period exits by itself
    (status 0), one that would not (a worker stuck in a read) is killed once the grace period is over."""
    ctx = multiprocessing.get_context("spawn")
    leaving, stuck = ctx.Process(target=time.sleep, args=(0,)), ctx.Process(target=time.sleep, args=(600,))
    leaving.start()
    stuck.start()
    t0 = time.monotonic()
    stop_processes([leaving, stuck], grace_s=5.0)
    assert time.monotonic() - t0 < 30
    assert not leaving.is_alive() and leaving.exitcode == 0
    assert not stuck.is_alive() and stuck.exitcode == -signal.SIGKILL
