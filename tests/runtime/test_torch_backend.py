"""The torch backend (`ltserve.runtime.torch_runner.TorchRunner`) against ONNX Runtime on the same exported package.

The package is the tiny re-balanced run's tau_norm head exported with `--model-format onnx,pt2` (the real exporter), and
the inputs are real Fashion-MNIST test images through the serving preprocessing. CUDA tests carry the `gpu` marker.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ltserve.errors import ConfigError, PackageError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pt2_package(tmp_path_factory, tiny_rebalanced_run) -> Path:
    """The tiny run's tau_norm head as a package holding model.onnx and model.pt2 (read-only)."""
    from ltserve.export import export_package

    out = tmp_path_factory.mktemp("models") / "tiny-tau_norm-pt2"
    export_package(tiny_rebalanced_run, "tau_norm", out, formats=("onnx", "pt2"), verify_images=64, progress=False)
    return out


@pytest.fixture(scope="module")
def test_batch(pt2_package) -> np.ndarray:
    """64 real Fashion-MNIST test images, preprocessed as the package says: float32 (64, 1, 28, 28)."""
    from ltserve.data import find_fashion_mnist, read_idx
    from ltserve.package import load_package
    from ltserve.preprocess import to_model_input

    spec = load_package(pt2_package, verify=False).preprocess
    images = read_idx(find_fashion_mnist() / "t10k-images-idx3-ubyte.gz")[:64]
    return to_model_input([img[..., None] for img in images], spec)


def _without_pt2(src: Path, dst: Path) -> Path:
    """A copy of the package with model.pt2 deleted and unlisted (a valid ONNX-only package)."""
    shutil.copytree(src, dst)
    (dst / "model.pt2").unlink()
    meta = json.loads((dst / "model.json").read_text())
    meta["files"].pop("model.pt2")
    (dst / "model.json").write_text(json.dumps(meta, indent=2))
    return dst


def test_torch_cpu_matches_onnxruntime(pt2_package, test_batch):
    from ltserve.runtime import Predictor
    from ltserve.runtime.torch_runner import TorchRunner

    ort_logits = Predictor(pt2_package, providers=["cpu"], threads=2, max_batch_size=64).predict(test_batch)
    runner = TorchRunner(pt2_package, device="cpu", max_batch_size=64)
    torch_logits = runner.run(test_batch)
    assert torch_logits.dtype == np.float32 and torch_logits.shape == ort_logits.shape == (64, 10)
    np.testing.assert_allclose(torch_logits, ort_logits, atol=1e-4, rtol=0)
    assert np.array_equal(torch_logits.argmax(1), ort_logits.argmax(1))
    assert runner.info()["device"] == "cpu" and runner.info()["cuda_graphs"] is False


def test_predictor_torch_backend_matches_onnxruntime(pt2_package, test_batch, monkeypatch):
    """The service and `ltserve predict` select the torch backend through the Predictor: same top-1, logits 1e-4."""
    from ltserve.runtime import Predictor

    monkeypatch.setenv("LTSERVE_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("LTSERVE_TORCH_PRECISION", "fp32")
    ort_pred = Predictor(pt2_package, providers=["cpu"], threads=2, max_batch_size=16)
    torch_pred = Predictor(pt2_package, threads=2, max_batch_size=16, backend="torch")
    assert torch_pred.info()["runtime"]["torch"]["device"] == "cpu"
    want, got = ort_pred.predict(test_batch[:37]), torch_pred.predict(test_batch[:37])
    assert np.array_equal(want.argmax(1), got.argmax(1))
    assert np.abs(want - got).max() < 1e-4
    rows = torch_pred.postprocess(got, top_k=3)
    assert [r.class_index for r in rows] == [int(i) for i in want.argmax(1)]


def test_predictor_torch_backend_needs_pt2(pt2_package, tmp_path):
    from ltserve.runtime import Predictor

    onnx_only = _without_pt2(pt2_package, tmp_path / "onnx-only")
    with pytest.raises(PackageError, match="--model-format onnx,pt2"):
        Predictor(onnx_only, backend="torch")


def test_chunks_and_odd_batches_give_the_same_rows(pt2_package, test_batch):
    from ltserve.runtime.torch_runner import TorchRunner

    runner = TorchRunner(pt2_package, device="cpu", max_batch_size=8)
    whole = runner.run(test_batch[:21])  # 8 + 8 + 5
    rows = np.concatenate([runner.run(test_batch[i:i + 1]) for i in range(21)])
    np.testing.assert_allclose(whole, rows, atol=1e-5, rtol=0)
    assert runner.warmup([1, 3, 8]) >= 0.0
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        runner.run(np.zeros((2, 3, 28, 28), np.float32))


def test_missing_pt2_says_how_to_export_it(pt2_package, tmp_path):
    from ltserve.runtime.torch_runner import TorchRunner

    pkg = _without_pt2(pt2_package, tmp_path / "onnx-only")
    with pytest.raises(PackageError, match=r"--model-format onnx,pt2"):
        TorchRunner(pkg, device="cpu")


def test_corrupted_pt2_fails_its_sha256_check(pt2_package, tmp_path):
    from ltserve.runtime.torch_runner import TorchRunner

    pkg = tmp_path / "corrupted"
    shutil.copytree(pt2_package, pkg)
    data = bytearray((pkg / "model.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (pkg / "model.pt2").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"model\.pt2: sha256 does not match"):
        TorchRunner(pkg, device="cpu")


@pytest.fixture(scope="module")
def png_dir(tmp_path_factory) -> Path:
    """24 Fashion-MNIST test images as PNG files."""
    from PIL import Image

    from ltserve.data import find_fashion_mnist, read_idx

    root = tmp_path_factory.mktemp("pngs")
    for i, img in enumerate(read_idx(find_fashion_mnist() / "t10k-images-idx3-ubyte.gz")[:24]):
        Image.fromarray(img).save(root / f"{i:03d}.png")
    return root


def ray_torch_predict(images: Path, model: Path, out: Path) -> subprocess.CompletedProcess:
    """`ltserve predict --engine ray --backend torch` (CPU, fp32: comparable with ONNX Runtime on any machine)."""
    args = [model, images, "--out", out, "--engine", "ray", "--backend", "torch", "--torch-device", "cpu",
            "--torch-precision", "fp32", "--ray-num-cpus", 2, "--workers", 1, "--batch-size", 16, "--no-progress"]
    return subprocess.run([sys.executable, "-m", "ltserve.cli", "predict", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_ray_engine_runs_the_torch_backend_in_its_actors(pt2_package, png_dir, tmp_path):
    """--backend reaches every Ray actor: without model.pt2 the actors fail with the torch backend's own error
    (shown as the local engine shows it); with it, the same classes as ONNX Runtime."""
    from ltserve.runtime import Predictor

    onnx_only = _without_pt2(pt2_package, tmp_path / "onnx-only")
    proc = ray_torch_predict(png_dir, onnx_only, tmp_path / "none.jsonl")
    assert proc.returncode == 2, f"the torch backend never ran: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.pt2: not found" in last and "--model-format onnx,pt2" in last
    assert "in a Ray Predictor actor" in last

    proc = ray_torch_predict(png_dir, pt2_package, tmp_path / "torch.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted((json.loads(line) for line in (tmp_path / "torch.jsonl").read_text().splitlines()),
                  key=lambda r: r["path"])
    assert len(rows) == 24
    want = Predictor(pt2_package, providers=["cpu"], threads=2).classify_bytes(
        [Path(r["path"]).read_bytes() for r in rows], top_k=5)
    assert [r["class_index"] for r in rows] == [p.class_index for p in want]
    assert [r["probability"] for r in rows] == pytest.approx([p.probability for p in want], abs=1e-4)


def test_actor_error_reads_the_ltserve_error_back_from_rays_text():
    from ltserve.batch.ray_engine import actor_error

    text = ("The actor died because of an error raised in its creation task, ray::MapWorker(...)\n"
            "Traceback (most recent call last):\n  ...\nltserve.errors.PackageError: /m/model.pt2: not found; re-export")
    err = actor_error(RuntimeError(text))
    assert isinstance(err, PackageError)
    assert str(err) == "/m/model.pt2: not found; re-export (in a Ray Predictor actor)"
    assert actor_error(RuntimeError("The actor died unexpectedly before finishing this task.")) is None
    assert actor_error(RuntimeError("ltserve.errors.NotAnError: x")) is None


def test_batch_torch_options_reach_the_runner_and_need_the_torch_backend(pt2_package, png_dir, tmp_path):
    from ltserve.batch.job import run_predict
    from ltserve.batch.options import PredictOptions

    opts = PredictOptions(inputs=[str(png_dir)], model=pt2_package, out=tmp_path / "p.jsonl", workers=0,
                          progress=False, backend="torch", torch_options={"device": "cpu", "precision": "fp16"})
    with pytest.raises(ConfigError, match="precision 'fp16' needs a CUDA device"):  # raised by TorchRunner
        run_predict(opts)
    opts.backend = "onnxruntime"
    with pytest.raises(ConfigError, match="add --backend torch"):
        run_predict(opts)


def test_ltserve_predict_with_device_preprocess_writes_the_same_rows(pt2_package, png_dir, tmp_path):
    from ltserve.cli.predict import cli

    rows = {}
    for flag in ([], ["--torch-device-preprocess"]):
        out = tmp_path / f"p{len(flag)}.jsonl"
        args = [str(pt2_package), str(png_dir), "--out", str(out), "--workers", "0", "--backend", "torch",
                "--torch-device", "cpu", *flag]
        assert cli(args) == 0
        rows[len(flag)] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows[0]) == len(rows[1]) > 0
    for a, b in zip(rows[0], rows[1]):
        assert a["label"] == b["label"] and abs(a["probability"] - b["probability"]) < 1e-5


def test_bad_device_and_precision_are_config_errors(pt2_package):
    import torch

    from ltserve.runtime.torch_runner import TorchRunner

    with pytest.raises(ConfigError, match="fp16"):
        TorchRunner(pt2_package, device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda"):
        TorchRunner(pt2_package, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            TorchRunner(pt2_package, device="cuda")
        # auto on a CPU machine: fp16 falls back to fp32 rather than failing a deployment
        assert TorchRunner(pt2_package, device="auto", precision="fp16").precision == "fp32"


def test_importing_the_backend_does_not_import_torch():
    code = "import sys, ltserve.runtime.torch_runner; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.gpu
def test_cuda_fp16_graphs_agree_with_cpu(pt2_package, test_batch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ltserve.runtime.torch_runner import TorchRunner

    ref = TorchRunner(pt2_package, device="cpu").run(test_batch)
    for precision, graphs, atol in (("fp32", False, 1e-3), ("fp32", True, 1e-3), ("fp16", True, 5e-2)):
        runner = TorchRunner(pt2_package, device="cuda", precision=precision, cuda_graphs=graphs, max_batch_size=32)
        runner.warmup([1, 5, 32])
        got = np.concatenate([runner.run(test_batch[:5]), runner.run(test_batch[5:])])  # buckets 8, then 32 + 32
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=atol * max(1.0, float(np.abs(ref).max())), rtol=0)
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98
        assert len(runner.device_latency_ms(8, iters=3)) == 3


# -- device_preprocess: uint8 pixels in, normalised by the runner (on CPU here; the gpu test below on CUDA) ----------

@pytest.fixture(scope="module")
def fashion_pixels(pt2_package) -> np.ndarray:
    """64 Fashion-MNIST test images as PNG bytes through the serving decoder: uint8 (64, 28, 28, 1)."""
    from PIL import Image

    from ltserve.data import find_fashion_mnist, read_idx
    from ltserve.package import load_package
    from ltserve.preprocess import decode, stack_pixels

    spec = load_package(pt2_package, verify=False).preprocess
    out = []
    for img in read_idx(find_fashion_mnist() / "t10k-images-idx3-ubyte.gz")[64:128]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(decode(buf.getvalue(), spec))
    return stack_pixels(out, spec)


@pytest.fixture(scope="module")
def rgb_pt2_package(tmp_path_factory) -> Path:
    """A 3-channel package (random Gemm, 64 px, ImageNet mean/std) with model.onnx and model.pt2."""
    from tests.package_helpers import build_random_rgb_package

    return build_random_rgb_package(tmp_path_factory.mktemp("models") / "rgb-pt2", size=64, pt2=True)


@pytest.fixture(scope="module")
def photo_pixels(rgb_pt2_package) -> np.ndarray:
    """Real photos (scikit-learn, scikit-image), 4 random crops each as JPEG bytes, through the serving decoder."""
    from PIL import Image

    from benchmarks.gpu.prepare_corpus import source_photos
    from ltserve.package import load_package
    from ltserve.preprocess import decode, stack_pixels

    spec = load_package(rgb_pt2_package, verify=False).preprocess
    rng = np.random.default_rng(0)
    out = []
    for photo in source_photos().values():
        h, w = photo.shape[:2]
        for _ in range(4):
            ch, cw = int(h * rng.uniform(0.4, 1)), int(w * rng.uniform(0.4, 1))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            buf = io.BytesIO()
            Image.fromarray(photo[y:y + ch, x:x + cw]).convert("RGB").save(buf, format="JPEG", quality=90)
            out.append(decode(buf.getvalue(), spec))
    return stack_pixels(out, spec)


@pytest.mark.parametrize("package, pixels", [("pt2_package", "fashion_pixels"), ("rgb_pt2_package", "photo_pixels")])
def test_device_preprocess_gives_the_float_paths_logits(package, pixels, request):
    """uint8 pixels normalised by the runner = the host's float32 NCHW, on real PNGs (grey) and JPEG photos (RGB)."""
    from ltserve.preprocess import normalize_pixels
    from ltserve.runtime.torch_runner import TorchRunner

    model_dir, px = request.getfixturevalue(package), request.getfixturevalue(pixels)
    runner = TorchRunner(model_dir, device="cpu", max_batch_size=16, device_preprocess=True)
    exact = runner.run(normalize_pixels(px, runner.meta.preprocess))
    fast = runner.run_pixels(px)  # 64 rows in chunks of 16; the photos' last chunk is short
    assert fast.dtype == np.float32 and fast.shape == exact.shape and len(px) >= 28
    assert np.abs(fast - exact).max() <= 1e-5 * max(1.0, float(np.abs(exact).max()))
    assert np.array_equal(fast.argmax(1), exact.argmax(1))
    assert runner.info()["device_preprocess"] is True


def test_predictor_hands_the_runner_pixels_when_it_normalises_on_its_device(pt2_package, fashion_pixels):
    from ltserve.runtime import Predictor

    host = Predictor(pt2_package, threads=2, max_batch_size=16, backend="torch", torch_options={"device": "cpu"})
    dev = Predictor(pt2_package, threads=2, max_batch_size=16, backend="torch",
                    torch_options={"device": "cpu", "device_preprocess": True})
    images = list(fashion_pixels[:37])
    assert host.preprocess(images).dtype == np.float32 and dev.preprocess(images).dtype == np.uint8
    want, got = host.predict(host.preprocess(images)), dev.predict(dev.preprocess(images))
    assert np.abs(want - got).max() < 1e-5 and np.array_equal(want.argmax(1), got.argmax(1))
    # either kind of batch goes to either predictor
    assert np.abs(dev.predict(host.preprocess(images)) - want).max() < 1e-5
    assert np.abs(host.predict(dev.preprocess(images)) - want).max() < 1e-5
    runtime = dev.info()["runtime"]
    assert runtime["preprocess_on"] == "cpu" and runtime["device_preprocess_check"]["passed"] is True
    assert host.info()["runtime"]["preprocess_on"] == "host" and "device_preprocess_check" not in host.info()["runtime"]


def test_a_device_path_that_disagrees_is_not_used(pt2_package, fashion_pixels, monkeypatch, caplog):
    """The start-up check catches a wrong device normalisation (here: std forgotten) and normalises on the host."""
    from ltserve.runtime import Predictor
    from ltserve.runtime.torch_runner import TorchRunner

    monkeypatch.setattr(TorchRunner, "_normalize",
                        lambda self, px: ((px.float() / 255.0) - self._mean).permute(0, 3, 1, 2).contiguous())
    pred = Predictor(pt2_package, threads=2, max_batch_size=8, backend="torch",
                     torch_options={"device": "cpu", "device_preprocess": True})
    check = pred.info()["runtime"]["device_preprocess_check"]
    assert check["passed"] is False and check["max_abs_diff"] > check["tolerance"]
    assert pred.info()["runtime"]["preprocess_on"] == "host"
    assert pred.preprocess(list(fashion_pixels[:3])).dtype == np.float32
    assert "normalising on the host instead" in caplog.text


def test_run_pixels_checks_its_input(pt2_package):
    from ltserve.runtime.torch_runner import TorchRunner

    with pytest.raises(RuntimeError, match="device_preprocess=True"):
        TorchRunner(pt2_package, device="cpu").run_pixels(np.zeros((1, 28, 28, 1), np.uint8))
    runner = TorchRunner(pt2_package, device="cpu", device_preprocess=True)
    for bad in (np.zeros((1, 28, 28, 1), np.float32), np.zeros((1, 1, 28, 28), np.uint8),
                np.zeros((0, 28, 28, 1), np.uint8)):
        with pytest.raises(ValueError, match=r"uint8 \(N, 28, 28, 1\)"):
            runner.run_pixels(bad)


def test_device_preprocess_setting_reaches_the_runner_options(monkeypatch):
    from ltserve.serve.settings import ServiceSettings

    assert ServiceSettings.from_env().torch_options()["device_preprocess"] is False
    monkeypatch.setenv("LTSERVE_TORCH_DEVICE_PREPROCESS", "1")
    assert ServiceSettings.from_env().torch_options()["device_preprocess"] is True


@pytest.mark.gpu
def test_cuda_device_preprocess_agrees_with_the_host_path(pt2_package, fashion_pixels):
    """On CUDA (fp32 and fp16, CUDA graphs): pixels normalised in the graph = float32 input normalised on the host."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ltserve.preprocess import normalize_pixels
    from ltserve.runtime.torch_runner import TorchRunner

    for precision, atol in (("fp32", 1e-3), ("fp16", 2e-2)):
        runner = TorchRunner(pt2_package, device="cuda", precision=precision, max_batch_size=32, device_preprocess=True)
        runner.warmup([1, 5, 32])
        exact = runner.run(normalize_pixels(fashion_pixels, runner.meta.preprocess))
        fast = np.concatenate([runner.run_pixels(fashion_pixels[:5]), runner.run_pixels(fashion_pixels[5:])])
        np.testing.assert_allclose(fast, exact, atol=atol * max(1.0, float(np.abs(exact).max())), rtol=0)
        assert (fast.argmax(1) == exact.argmax(1)).mean() >= 0.99
        on_device = runner.run_pixels(torch.from_numpy(fashion_pixels).cuda())
        np.testing.assert_allclose(on_device, fast, atol=1e-6, rtol=0)


SERVICE_SCRIPT = """
import json, sys
from pathlib import Path
from starlette.testclient import TestClient
from ltserve.service import Classifier

with TestClient(Classifier.to_asgi()) as client:
    model = client.get("/model").json()
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(Path(sys.argv[1]).glob("*.png"))[:6]]
    answers = client.post("/classify_batch", files=files).json()
print(json.dumps({"runtime": model["runtime"], "answers": answers}))
"""


def test_service_runs_the_device_path_and_get_model_says_so(pt2_package, png_dir):
    """LTSERVE_TORCH_DEVICE_PREPROCESS=1 through the real service (`to_asgi()`): GET /model reports the checked
    device path, and the answers are the host path's."""
    from ltserve.runtime import Predictor

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LTSERVE_")}, "LTSERVE_MODEL": str(pt2_package),
           "LTSERVE_BACKEND": "torch", "LTSERVE_TORCH_DEVICE": "cpu", "LTSERVE_TORCH_DEVICE_PREPROCESS": "1",
           "LTSERVE_THREADS": "1", "LTSERVE_WORKERS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SERVICE_SCRIPT, str(png_dir)], capture_output=True, text=True,
                         timeout=180, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"]["preprocess_on"] == "cpu" and got["runtime"]["device_preprocess_check"]["passed"] is True
    assert got["runtime"]["torch"]["device_preprocess"] is True
    host = Predictor(pt2_package, threads=1, backend="torch", torch_options={"device": "cpu"})
    want = host.classify_bytes([p.read_bytes() for p in sorted(png_dir.glob("*.png"))[:6]], top_k=1)
    assert [a["label"] for a in got["answers"]["predictions"]] == [w.label for w in want]
