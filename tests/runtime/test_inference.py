"""Predictor (real ONNX Runtime on a real package), AsyncPredictor batching, and `ltserve evaluate` of a package."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltserve.errors import ConfigError, InvalidImage, PackageError
from ltserve.runtime import Prediction, Predictor
from ltserve.runtime.buckets import batch_buckets
from ltserve.serve.batcher import AsyncPredictor
from package_helpers import build_lsq_package, build_random_rgb_package, read_fashion

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lsq_package(tmp_path_factory) -> Path:
    return build_lsq_package(tmp_path_factory.mktemp("models") / "fashion-lsq")


@pytest.fixture(scope="module")
def predictor(lsq_package) -> Predictor:
    return Predictor(lsq_package, threads=2, max_batch_size=8)


@pytest.fixture(scope="module")
def fashion_test():
    return read_fashion("t10k")


def gemm_reference(package: Path, x: np.ndarray) -> np.ndarray:
    """The package's logits computed with NumPy from the ONNX initializers (independent of ONNX Runtime)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(package / "model.onnx")).graph.initializer}
    return x.reshape(len(x), -1).astype(np.float64) @ inits["W"].T.astype(np.float64) + inits["b"]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- Predictor -------------------------------------------------------------------------------------------------------


def test_loads_package_and_reports_runtime(predictor, lsq_package):
    assert predictor.providers[0] == "CPUExecutionProvider"
    assert predictor.threads == 2
    assert predictor.buckets == [1, 2, 4, 8]
    assert predictor.labels[0] == "T-shirt/top" and predictor.num_classes == 10
    info = predictor.info()
    assert info["runtime"]["batch_buckets"] == [1, 2, 4, 8] and info["shot_groups"][-1] == "few"
    assert Predictor(lsq_package).threads == os.cpu_count()


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("n", [1, 3, 5, 8, 11, 20])
def test_padded_batches_equal_single_images_and_numpy(predictor, lsq_package, fashion_test, n):
    images, _ = fashion_test
    x = predictor.preprocess(list(images[:n, :, :, None]))
    assert x.dtype == np.float32 and x.shape == (n, 1, 28, 28)
    logits = predictor.predict(x)
    assert logits.shape == (n, 10) and logits.dtype == np.float32
    singles = np.concatenate([predictor.predict(x[i:i + 1]) for i in range(n)])
    np.testing.assert_allclose(logits, singles, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(logits, gemm_reference(lsq_package, x), rtol=1e-4, atol=1e-3)


def test_predict_rejects_wrong_shapes(predictor):
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        predictor.predict(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ValueError):
        predictor.predict(np.zeros((0, 1, 28, 28), np.float32))


def test_postprocess(predictor, fashion_test):
    images, labels = fashion_test
    logits = predictor.predict(predictor.preprocess(list(images[:64, :, :, None])))
    preds = predictor.postprocess(logits, top_k=3)
    assert len(preds) == 64 and all(isinstance(p, Prediction) for p in preds)
    for p, row in zip(preds, logits):
        assert p.class_index == int(row.argmax()) and p.label == predictor.labels[p.class_index]
        assert p.shot_group == predictor.shot_groups[p.class_index]
        assert [e.class_index for e in p.top_k][0] == p.class_index and len(p.top_k) == 3
        probs = [e.probability for e in p.top_k]
        assert probs == sorted(probs, reverse=True) and p.probability == probs[0]
        z = np.exp(row.astype(np.float64) - row.max())
        assert abs(p.probability - z.max() / z.sum()) < 1e-9
    full = predictor.postprocess(logits[:1], top_k=100)[0]  # clipped to the 10 classes
    assert len(full.top_k) == 10 and abs(sum(e.probability for e in full.top_k) - 1.0) < 1e-9
    assert np.mean([p.class_index for p in preds] == labels[:64]) > 0.6  # the least-squares model is meaningful
    with pytest.raises(ValueError, match="top_k"):
        predictor.postprocess(logits[:1], top_k=0)
    assert json.loads(preds[0].model_dump_json())["top_k"][0]["label"] == preds[0].label


def test_classify_bytes_matches_arrays(predictor, fashion_test):
    images, _ = fashion_test
    by_bytes = predictor.classify_bytes([png(a) for a in images[:10]], top_k=2)
    by_arrays = predictor.classify(list(images[:10, :, :, None]), top_k=2)
    assert by_bytes == by_arrays
    with pytest.raises(InvalidImage):
        predictor.classify_bytes([b"not an image"])


def test_rgb_package_and_colour_inputs(tmp_path):
    pkg = build_random_rgb_package(tmp_path / "rgb")
    p = Predictor(pkg, threads=1, max_batch_size=4)
    from sklearn.datasets import load_sample_images

    china = Image.fromarray(load_sample_images().images[0])
    buf = io.BytesIO()
    china.save(buf, format="JPEG")
    preds = p.classify_bytes([buf.getvalue()] * 3, top_k=5)
    assert len({pr.class_index for pr in preds}) == 1 and len(preds[0].top_k) == 5


def test_broken_packages_are_refused(lsq_package, tmp_path):
    with pytest.raises(PackageError, match="not found"):
        Predictor(tmp_path / "missing")
    tampered = tmp_path / "tampered"
    shutil.copytree(lsq_package, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match="sha256"):
        Predictor(tampered)
    renamed = tmp_path / "renamed"
    shutil.copytree(lsq_package, renamed)
    meta = json.loads((renamed / "model.json").read_text())
    meta["input_name"] = "pixels"
    (renamed / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="'pixels'"):
        Predictor(renamed)
    wrong_size = tmp_path / "wrong_size"
    shutil.copytree(lsq_package, wrong_size)
    meta = json.loads((wrong_size / "model.json").read_text())
    meta["preprocess"].update(resize=32, crop=32)
    (wrong_size / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="does not match"):
        Predictor(wrong_size)


def test_backend_and_provider_errors(lsq_package, caplog):
    with pytest.raises(PackageError, match="--model-format onnx,pt2"):  # an ONNX-only package has no model.pt2
        Predictor(lsq_package, backend="torch")
    with pytest.raises(ConfigError, match="backend"):
        Predictor(lsq_package, backend="tensorflow")
    with pytest.raises(ConfigError, match="provider 'gpu-fast'"):
        Predictor(lsq_package, providers=["gpu-fast"])
    with pytest.raises(ConfigError, match="max_batch_size"):
        Predictor(lsq_package, max_batch_size=0)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with caplog.at_level(logging.WARNING, logger="ltserve.runtime.onnx_runner"):
            p = Predictor(lsq_package, providers="cuda,cpu", threads=1)
        assert p.providers == ["CPUExecutionProvider"]
        assert "CUDAExecutionProvider" in caplog.text


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_missing_onnxruntime_names_the_extra(lsq_package):
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime' (blocked by the test)")
sys.meta_path.insert(0, Block())
from ltserve.runtime import Predictor
from ltserve.errors import MissingDependency
try:
    Predictor({str(lsq_package)!r})
except MissingDependency as exc:
    print("MESSAGE:", exc)
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert '.[cpu]' in out.stdout and '.[gpu]' in out.stdout


def test_serving_modules_do_not_import_torch():
    code = ("import sys; import ltserve.runtime, ltserve.service, ltserve.cli, ltserve.evaluate.package, "
            "ltserve.cli.evaluate, ltserve.cli.predict, ltserve.cli.inspect, ltserve.serve.batcher; "
            "print('torch' in sys.modules, 'torchvision' in sys.modules)")
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                             env={**os.environ, "LTSERVE_MODEL": "/nonexistent"})
    assert env_out.returncode == 0, env_out.stderr
    assert env_out.stdout.split() == ["False", "False"]


# -- AsyncPredictor --------------------------------------------------------------------------------------------------


def test_async_predictor_batches_concurrent_requests(predictor, fashion_test, monkeypatch):
    images, _ = fashion_test
    files = [png(a) for a in images[:48]]
    expected = predictor.classify_bytes(files, top_k=3)
    sizes: list[int] = []
    # the batch size follows the warm-up's measured bucket times, which a loaded machine can make favour single
    # images; a fixed cost per call (the tiny model's real profile) makes the larger batch the one to run
    monkeypatch.setattr(predictor, "bucket_ms", {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5})

    async def main():
        engine = AsyncPredictor(predictor, max_batch_size=8, max_latency_ms=20, on_batch=sizes.append)
        try:
            singles = await asyncio.gather(*(engine.classify([f], top_k=3) for f in files))
            pair = await engine.classify(files[:2], top_k=3)
            with pytest.raises(InvalidImage, match=r"images\[1\]"):
                await engine.classify([files[0], b"garbage", files[2]])
            with pytest.raises(InvalidImage):
                await engine.classify([b""])
            assert engine.running
            return [s[0] for s in singles], pair
        finally:
            engine.close()

    singles, pair = asyncio.run(main())
    assert singles == expected and pair == expected[:2]
    assert sum(sizes[:-1]) == 48 and max(sizes) > 1 and max(sizes) <= 8


def test_decode_pool_size_follows_where_the_model_runs(predictor):
    """On CPU, decoding leaves cores to inference (at most 4 threads); an explicit count wins."""
    assert not predictor.on_accelerator and predictor.providers[0] == "CPUExecutionProvider"
    for threads, expected in ((None, min(4, os.cpu_count() or 1)), (7, 7)):
        engine = AsyncPredictor(predictor, decode_threads=threads)
        try:
            assert engine.decode_threads == expected
        finally:
            engine.close()


def test_async_predictor_without_batching(predictor, fashion_test):
    images, _ = fashion_test
    files = [png(a) for a in images[:12]]
    sizes: list[int] = []

    async def main():
        engine = AsyncPredictor(predictor, max_batch_size=1, max_latency_ms=0, on_batch=sizes.append)
        try:
            return await asyncio.gather(*(engine.classify([f], top_k=1) for f in files))
        finally:
            engine.close()

    out = asyncio.run(main())
    assert [o[0] for o in out] == predictor.classify_bytes(files, top_k=1)
    assert sizes == [1] * 12


# -- ltserve evaluate on a package -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_png_list(tmp_path_factory, fashion_test) -> Path:
    """The whole Fashion-MNIST test set written as PNG files, with a split list `relative/path label`."""
    images, labels = fashion_test
    root = tmp_path_factory.mktemp("fashion_png")
    lines = []
    for i, (a, y) in enumerate(zip(images, labels)):
        rel = f"img/{i // 1000}/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / rel)
        lines.append(f"{rel} {y}")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    return root / "test.txt"


def ltserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltserve.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def test_predictor_on_png_files_agrees_with_ltserve_evaluate(lsq_package, fashion_png_list, predictor, tmp_path):
    out = ltserve("evaluate", str(lsq_package), "--data", "fashion-mnist:test", "--json", str(tmp_path / "e.json"),
                  "--predictions", str(tmp_path / "e.csv"))
    assert out.returncode == 0, out.stderr
    assert "| head | Many | Medium | Few | All |" in out.stdout and "| lstsq |" in out.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    with open(tmp_path / "e.csv") as f:
        rows = list(csv.DictReader(f))
    eval_pred = np.array([int(r["pred"]) for r in rows])
    eval_label = np.array([int(r["label"]) for r in rows])
    assert len(rows) == report["n"] == 10000

    # the Predictor, one PNG file at a time, in batches of 256
    lines = fashion_png_list.read_text().split("\n")[:-1]
    root = fashion_png_list.parent
    pred, labels = [], []
    for start in range(0, len(lines), 256):
        chunk = [line.split() for line in lines[start:start + 256]]
        preds = predictor.classify_bytes([(root / rel).read_bytes() for rel, _ in chunk], top_k=1)
        pred += [p.class_index for p in preds]
        labels += [int(y) for _, y in chunk]
    pred, labels = np.array(pred), np.array(labels)
    assert np.array_equal(labels, eval_label)
    agreement = float(np.mean(pred == eval_pred))
    assert agreement >= 0.999
    acc = float(np.mean(pred == labels))
    assert abs(acc - report["top1"]) <= 0.001 and abs(report["all"] - report["top1"]) < 1e-12
    assert report["top1"] > 0.75 and report["top5"] > report["top1"]

    # the same files through `ltserve evaluate LIST`: the file path (decode) gives the same numbers
    out_list = ltserve("evaluate", str(lsq_package), "--data", str(fashion_png_list), "--json",
                       str(tmp_path / "l.json"))
    assert out_list.returncode == 0, out_list.stderr
    report_list = json.loads((tmp_path / "l.json").read_text())
    assert abs(report_list["top1"] - report["top1"]) <= 0.001
    for g in ("many", "medium", "few"):
        assert abs(report_list[g] - report[g]) <= 0.002


def test_evaluate_shot_groups_limit_and_folders(lsq_package, fashion_png_list, tmp_path):
    from ltserve.evaluate.package import evaluate_package, format_report

    report, logits, labels = evaluate_package(lsq_package, "fashion-mnist:test", limit=500)
    assert report["n"] == len(labels) == 500 and logits.shape == (500, 10)
    assert np.bincount(labels, minlength=10).min() >= 45  # stratified subsample
    meta = json.loads((lsq_package / "model.json").read_text())
    pred = logits.argmax(1)
    per_class = [np.mean(pred[labels == c] == c) for c in range(10)]
    for g in ("many", "medium", "few"):
        members = [c for c in range(10) if meta["shot_groups"][c] == g]
        assert report["class_groups"][g] == [meta["labels"][c] for c in members]
        assert abs(report[g] - np.mean([per_class[c] for c in members])) < 1e-9
    assert "Medium" in format_report(report)

    # an image folder named by class (with '/' written as '_'), from the PNG files
    root = fashion_png_list.parent
    folder = tmp_path / "folder"
    for line in fashion_png_list.read_text().split("\n")[:200]:
        rel, y = line.split()
        dest = folder / meta["labels"][int(y)].replace("/", "_")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, dest / Path(rel).name)
    rep_folder, _, lab_folder = evaluate_package(lsq_package, str(folder))
    assert rep_folder["n"] == 200 and rep_folder["top1"] > 0.6

    bad = tmp_path / "bad.txt"
    bad.write_text(f"{root / 'img/0/00000.png'} 12\n")
    out = ltserve("evaluate", str(lsq_package), "--data", str(bad))
    assert out.returncode == 2 and "out of range" in out.stderr
    out = ltserve("evaluate", str(lsq_package), "--data", "fashion-mnist:val")
    assert out.returncode == 2 and "splits are 'train' and 'test'" in out.stderr


def write_tiff_or_pnm(path: Path, arr: np.ndarray) -> None:
    """A grey image in the format its file name says: .tif raw TIFF, .tiff deflate TIFF, .pgm/.pnm binary PGM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"format": "TIFF", "compression": "tiff_deflate"} if path.suffix == ".tiff" else \
        {"format": "TIFF"} if path.suffix == ".tif" else {"format": "PPM"}
    Image.fromarray(arr).save(path, **kw)


def test_evaluate_image_folder_of_tiff_and_pnm(lsq_package, fashion_test, tmp_path):
    """`ltserve evaluate PACKAGE --data FOLDER` of .tif/.tiff/.pgm/.pnm files: the logits of the same images as PNG."""
    from ltserve.evaluate.package import evaluate_package

    images, labels = fashion_test
    names = json.loads((lsq_package / "model.json").read_text())["labels"]
    for i in range(120):
        rel = Path(names[labels[i]].replace("/", "_")) / f"{i:05d}"
        write_tiff_or_pnm(tmp_path / "tiff_pnm" / rel.with_suffix((".tif", ".tiff", ".pgm", ".pnm")[i % 4]), images[i])
        (tmp_path / "png" / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "png" / rel.with_suffix(".png"))
    out = ltserve("evaluate", str(lsq_package), "--data", str(tmp_path / "tiff_pnm"), "--out", str(tmp_path / "t.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["n"] == 120 and report["top1"] > 0.6
    _, logits, lab = evaluate_package(lsq_package, str(tmp_path / "tiff_pnm"), progress=False)
    ref_report, ref_logits, ref_lab = evaluate_package(lsq_package, str(tmp_path / "png"), progress=False)
    assert np.array_equal(lab, ref_lab) and np.array_equal(logits, ref_logits)
    assert report["top1"] == ref_report["top1"] and report["few"] == ref_report["few"]


def test_batch_target_follows_measured_bucket_costs(lsq_package):
    p = Predictor(lsq_package, threads=1, max_batch_size=8)
    assert set(p.bucket_ms) == {1, 2, 4, 8} and all(t > 0 for t in p.bucket_ms.values())
    engine = AsyncPredictor(p, max_latency_ms=0)
    try:
        p.bucket_ms = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5}  # fixed cost per call: the largest batch wins
        assert [engine._batch_target(q) for q in (1, 2, 3, 5, 8, 20)] == [1, 2, 3, 5, 8, 8]
        p.bucket_ms = {1: 1.0, 2: 2.5, 4: 5.0, 8: 9.0}  # per-image cost grows with the batch: one at a time
        assert [engine._batch_target(q) for q in (1, 3, 8, 20)] == [1, 1, 1, 1]
        p.bucket_ms = {1: 1.0, 2: 1.2, 4: 2.0, 8: 8.0}  # padding 5 -> 8 does not pay: run 4, then the rest
        assert engine._batch_target(5) == 4 and engine._batch_target(4) == 4
    finally:
        engine.close()
