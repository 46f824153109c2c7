"""Export: every head folds into one Gemm whose ONNX logits equal the head's own formula on real images.

Two runs: the shared `tiny_rebalanced_run` (trained, every stage-2 head fitted and calibrated by ltserve), and a
synthetic run real in every part that export touches (a seeded resnet8_cifar with random BatchNorm statistics saved
as backbone.safetensors, run.json from configs/tiny.yaml) whose heads are fitted on real Fashion-MNIST features with
the folding formulas written out below in NumPy, in the variants the default recipe does not produce (tau_norm with
its bias, the training target prior, cosine ncm). The expected logits are recomputed in NumPy from the stored joint
weights and each head's parameters, on Fashion-MNIST test images read by a tiny IDX reader of this file.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ltserve.config import load_config
from ltserve.errors import ConfigError, PackageError
from ltserve.evaluate import best_head
from ltserve.export import export_package
from ltserve.export.graph import NORMALISATION_OPS
from ltserve.features.backbones import create_backbone, load_run_backbone
from ltserve.features.cache import cached_features
from ltserve.fileio import sha256_file
from ltserve.heads import HEADS, CalibratedHead, load_head, save_head
from ltserve.metrics import classification_report, expected_calibration_error, shot_groups, softmax
from ltserve.package import load_package
from ltserve.preprocess import PreprocessSpec, to_model_input
from ltserve.rundir import BackboneInfo, RunInfo, RunPaths, read_run, write_run

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
COUNTS = [200, 119, 71, 42, 25, 15, 8, 5, 3, 2]  # floor(200 * 100^(-i/9)): configs/tiny.yaml's long tail
HEAD_NAMES = HEADS.names()
FOLDED = [h for h in HEAD_NAMES if h != "ncm"]


def read_idx(path: Path) -> np.ndarray:
    """Minimal IDX reader (gzip), enough for the Fashion-MNIST uint8 files."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "t10k" if split == "test" else "train"
    return (read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz"),
            read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))


def features(run_dir: Path, images: np.ndarray, spec) -> np.ndarray:
    """Pooled features (N, D) of uint8 (N, 28, 28) images through the run's backbone, in torch."""
    backbone = load_run_backbone(run_dir)
    x = torch.from_numpy(to_model_input(list(images[..., None]), spec))
    with torch.no_grad():
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True).numpy().astype(np.float64)


def ridge(x: np.ndarray, y: np.ndarray, c: int, lam: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """A linear classifier by ridge regression on centred one-hot targets: (W (C, D), b (C,))."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    t = np.eye(c)[y] - 1.0 / c
    sol = np.linalg.solve(xa.T @ xa + lam * len(x) * np.eye(xa.shape[1]), xa.T @ t)
    return 8.0 * sol[:-1].T, 8.0 * sol[-1]


def tau_norm(w: np.ndarray, tau: float) -> np.ndarray:
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12) ** tau


def centred_l2(x: np.ndarray, mu: np.ndarray) -> np.ndarray:
    x = x - mu
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def build_run(root: Path) -> Path:
    """A run dir with a seeded random resnet8_cifar and the eight heads fitted on real Fashion-MNIST features, in
    the variants the default rebalance recipe does not produce: tau_norm keeping the bias, tau_norm+la dropping it,
    lws+la shifted to the training prior, cosine ncm, and hand-set temperatures."""
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    backbone = create_backbone("resnet8_cifar", in_chans=1)
    gen = torch.Generator().manual_seed(1)
    for m in backbone.modules():  # non-trivial BatchNorm, so BN folding into Conv is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    paths = RunPaths(root).make()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(paths.backbone))
    from ltserve.features.cache import splits_for

    # the real fingerprint of tiny.yaml's data, so the run's val/test splits (and its feature cache) are usable
    write_run(root, RunInfo(config=cfg.model_dump(mode="json"), class_names=CLASSES, class_counts=COUNTS,
                            data_fingerprint=splits_for(cfg.data).fingerprint, finished=True,
                            backbone=BackboneInfo(name="resnet8_cifar", in_chans=1, num_features=64)))
    images, labels = fmnist("train")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in enumerate(COUNTS)])
    bal = np.concatenate([rng.choice(np.flatnonzero(labels == c), 30, replace=False) for c in range(10)])
    feats = features(root, images[np.concatenate([idx, bal])], cfg.preprocess)
    x, y, xb, yb = feats[:len(idx)], labels[idx], feats[len(idx):], labels[bal]
    w0, b0 = ridge(x, y, 10)
    lp = log_prior(COUNTS)
    f = np.linspace(0.7, 1.4, 10)
    mu = x.mean(axis=0)
    xn = centred_l2(x, mu)
    cent = np.stack([xn[y == c].mean(axis=0) for c in range(10)])

    def val(acc: float) -> dict:
        return {"val": {"top1": acc, "balanced_accuracy": acc}}

    heads = [
        CalibratedHead(w0, b0, "joint", meta=val(0.50)),
        CalibratedHead(*ridge(xb, yb, 10), "crt", temperature=1.3, meta=val(0.60)),
        CalibratedHead(tau_norm(w0, 0.7), b0, "tau_norm", temperature=1.5,
                       meta={"tau": 0.7, "keep_bias": True, **val(0.61)}),
        CalibratedHead(f[:, None] * w0, f * b0, "lws", temperature=0.8, extras={"scales": f}, meta=val(0.55)),
        CalibratedHead(w0, b0 - 1.0 * lp, "la", meta={"tau_la": 1.0, "base": "joint", **val(0.58)}),
        CalibratedHead(tau_norm(w0, 0.5), np.zeros(10) - 0.8 * lp, "tau_norm+la", temperature=1.2,
                       meta={"tau_la": 0.8, "base": "tau_norm", "base_meta": {"tau": 0.5, "keep_bias": False},
                             **val(0.56)}),
        # shifted to the training prior (target_prior "train"): + log pi on the bias, stored as extras
        CalibratedHead(f[:, None] * w0, f * b0 - 0.5 * lp + lp, "lws+la",
                       extras={"scales": f, "target_log_prior": lp},
                       meta={"tau_la": 0.5, "base": "lws", "target_prior": {"kind": "train"}, **val(0.57)}),
        CalibratedHead(cent / np.linalg.norm(cent, axis=1, keepdims=True), np.zeros(10), "ncm",
                       feature_transform="centred_l2", centre=mu, temperature=0.5, extras={"centroids": cent},
                       meta={"metric": "cosine", **val(0.59)}),
    ]
    for h in heads:
        save_head(h, paths.heads)
    return root


def log_prior(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return np.log(counts / counts.sum())


def expected_logits(run_dir: Path, head: str, feats: np.ndarray) -> np.ndarray:
    """The head's logits from the stored JOINT weights and the head's parameters (NumPy, float64):
    tau_norm W/||W||^tau with or without b, lws f (W x + b), la - tau_la log pi, compositions, + log pi_target,
    / T; ncm -||x' - c||^2 or the cosine to the centroids (equal to the export up to a per-row constant)."""
    heads = RunPaths(run_dir).heads
    joint, h = load_head(heads, "joint"), load_head(heads, head)
    w0, b0 = joint.weight.astype(np.float64), joint.bias.astype(np.float64)
    meta = {**h.meta.get("base_meta", {}), **h.meta}
    if head == "ncm":
        xn = centred_l2(feats, h.centre.astype(np.float64))
        c = h.extras["centroids"].astype(np.float64)
        if meta["metric"] == "cosine":
            z = xn @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
        else:
            z = -((xn[:, None, :] - c[None]) ** 2).sum(-1)
        return z / h.temperature
    base = head.removesuffix("+la")
    if base in ("joint", "la"):
        w, b = w0, b0
    elif base == "crt":
        w, b = h.weight.astype(np.float64), h.bias.astype(np.float64)
    elif base == "tau_norm":
        w, b = tau_norm(w0, meta["tau"]), (b0 if meta["keep_bias"] else np.zeros_like(b0))
    else:
        f = h.extras["scales"].astype(np.float64)
        w, b = f[:, None] * w0, f * b0
    z = feats @ w.T + b
    if head == "la" or head.endswith("+la"):
        z = z - meta["tau_la"] * log_prior(read_run(run_dir).class_counts)
    if "target_log_prior" in h.extras:
        z = z + h.extras["target_log_prior"]
    return z / h.temperature


def onnx_logits(pkg: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


SYNTH_HEADS = ("tau_norm", "tau_norm+la", "lws+la", "ncm")


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("runs") / "synth")


@pytest.fixture(scope="module")
def packages(tiny_rebalanced_run, synth_run, tmp_path_factory) -> dict[str, Path]:
    """Every head of the real tiny run (trained, re-balanced, calibrated), and the synthetic run's variant heads
    ("synth/<head>"), exported once."""
    out = tmp_path_factory.mktemp("models")
    pkgs = {}
    for h in HEAD_NAMES:
        pkgs[h] = out / h
        export_package(tiny_rebalanced_run, h, pkgs[h], progress=False)
    for h in SYNTH_HEADS:
        pkgs[f"synth/{h}"] = out / f"synth-{h}"
        export_package(synth_run, h, pkgs[f"synth/{h}"], progress=False)
    return pkgs


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """200 Fashion-MNIST test images (the first 200) as model input (N, 1, 28, 28)."""
    images, _ = fmnist("test")
    return to_model_input(list(images[:200, :, :, None]), load_config(REPO / "configs" / "tiny.yaml").preprocess)


@pytest.fixture(scope="module")
def run_features(tiny_rebalanced_run, synth_run, inputs) -> dict[str, np.ndarray]:
    """Pooled features (N, D) of `inputs` through each run's backbone, in torch."""
    out = {}
    for key, run in (("tiny", tiny_rebalanced_run), ("synth", synth_run)):
        backbone = load_run_backbone(run)
        with torch.no_grad():
            out[key] = backbone(torch.from_numpy(inputs)).numpy().astype(np.float64)
    return out


@pytest.mark.parametrize("key", [*HEAD_NAMES, *(f"synth/{h}" for h in SYNTH_HEADS)])
def test_onnx_logits_equal_the_heads_formula(key, packages, tiny_rebalanced_run, synth_run, inputs, run_features):
    synth = key.startswith("synth/")
    run, head = (synth_run if synth else tiny_rebalanced_run), key.removeprefix("synth/")
    got = onnx_logits(packages[key], inputs).astype(np.float64)
    want = expected_logits(run, head, run_features["synth" if synth else "tiny"])
    if head == "ncm":  # the folded ncm drops -||x'||^2, equal for every class: compare up to a per-row constant
        got, want = got - got.mean(1, keepdims=True), want - want.mean(1, keepdims=True)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.995
    meta = load_package(packages[key])
    assert meta.head.name == head
    assert meta.head.temperature == load_head(RunPaths(run).heads, head).temperature
    assert meta.verification["fp32"]["max_abs_diff"] <= meta.verification["fp32"]["tolerance"]


def test_node_counts_folded_equal_joint_and_ncm_adds_only_its_normalisation(packages):
    graphs = {k: onnx.load(str(p / "model.onnx")).graph for k, p in packages.items()}
    ops = {k: Counter(n.op_type for n in g.node) for k, g in graphs.items()}
    joint = len(graphs["joint"].node)
    assert ops["joint"]["Gemm"] == 1 and "MatMul" not in ops["joint"]
    for key in [*FOLDED, *(f"synth/{h}" for h in SYNTH_HEADS if h != "ncm")]:  # temperatures, bias or not, priors
        assert len(graphs[key].node) == joint, key
        assert ops[key] == ops["joint"], key
        assert load_package(packages[key]).graph.nodes == joint
    for key in ("ncm", "synth/ncm"):
        assert len(graphs[key].node) == joint + len(NORMALISATION_OPS)
        assert ops[key] - ops["joint"] == Counter(NORMALISATION_OPS) and not ops["joint"] - ops[key]


def test_package_is_one_file_with_a_symbolic_float32_batch(packages, inputs):
    pkg = packages["lws"]
    assert sorted(p.name for p in pkg.iterdir()) == ["model.json", "model.onnx"]
    model = onnx.load(str(pkg / "model.onnx"))
    (inp,), (out, *extra) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    # the one other output: the penultimate features (open-set rejection), float32 (batch, D), no node added for it
    assert [o.name for o in extra] == ["features"]
    assert extra[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [1, 28, 28]
    x = inputs
    full = onnx_logits(pkg, x[:32])
    for n in (1, 7, 32):
        np.testing.assert_allclose(onnx_logits(pkg, x[:n]), full[:n], rtol=1e-5, atol=1e-5)


def test_model_json_records_labels_head_preprocess_and_provenance(packages, tiny_rebalanced_run, synth_run):
    info = read_run(tiny_rebalanced_run)
    meta = load_package(packages["tau_norm+la"])
    assert meta.labels == info.class_names and meta.class_counts == info.class_counts
    assert meta.shot_groups == shot_groups(info.class_counts, info.many_threshold, info.few_threshold)
    assert (meta.shot_thresholds.many, meta.shot_thresholds.few) == (info.many_threshold, info.few_threshold)
    assert meta.preprocess == PreprocessSpec.model_validate(info.config["preprocess"])
    head = load_head(RunPaths(tiny_rebalanced_run).heads, "tau_norm+la")
    # calibrated by rebalance: the fitted T is kept only when it lowers the val ECE (T = 1 is a correct outcome too),
    # recorded either way, and the same in model.json and the head file
    cal = head.meta["calibration"]
    assert meta.head.temperature == head.temperature == cal["temperature"]
    assert meta.head.params["calibration"] == cal
    assert cal["applied"] == (cal["val_ece_fitted"] < cal["val_ece_before"])
    assert cal["temperature"] == (cal["fitted_temperature"] if cal["applied"] else 1.0)
    assert cal["val_ece_after"] == cal["val_ece_fitted" if cal["applied"] else "val_ece_before"]
    val_x, val_y = cached_features(tiny_rebalanced_run, "val", progress=False)
    raw = head.uncalibrated_logits(val_x)  # the recorded ECEs are the ones of the val split
    for key, t in (("before", 1.0), ("fitted", cal["fitted_temperature"])):
        ece = expected_calibration_error(softmax(raw / t), np.asarray(val_y, dtype=np.int64))
        assert ece == pytest.approx(cal[f"val_ece_{key}"], abs=1e-6), key
    assert meta.head.params["tau"] == head.meta["base_meta"]["tau"]
    assert meta.head.params["tau_la"] == head.meta["tau_la"]
    assert meta.head.params["target_prior"] == {"kind": "uniform"}
    assert meta.metrics["val"]["top1"] == head.meta["val"]["top1"]
    assert meta.provenance.config_hash and meta.provenance.created and meta.provenance.ltserve_version
    assert meta.provenance.run == str(tiny_rebalanced_run)
    assert meta.graph.precision == "fp32" and meta.graph.opset >= 18
    v = meta.verification
    assert v["inputs"]["split"] == "test" and v["inputs"]["images"] == 256
    assert v["inputs"]["data_fingerprint"] == info.data_fingerprint
    assert v["fp32"]["top1_agreement"] >= v["fp32"]["min_top1_agreement"]
    assert v["graph"]["head_ops"] == ["Gemm"]
    assert v["warnings"] == []  # no tiny lws scale in a healthy package
    assert load_package(packages["ncm"]).verification["graph"]["head_ops"] == [*NORMALISATION_OPS, "Gemm"]
    lws = load_package(packages["synth/lws+la"])
    assert lws.head.params["scales"] == pytest.approx({"min": 0.7, "mean": 1.05, "max": 1.4})
    assert lws.head.params["target_prior"] == {"kind": "train"} and lws.head.params["tau_la"] == 0.5
    assert lws.metrics["val"]["top1"] == pytest.approx(0.57)
    synth_tau = load_package(packages["synth/tau_norm"]).head
    assert (synth_tau.params["tau"], synth_tau.params["keep_bias"], synth_tau.temperature) == (0.7, True, 1.5)


@pytest.fixture(scope="module")
def fp16_pt2(tiny_rebalanced_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "ncm-fp16"
    export_package(tiny_rebalanced_run, "ncm", out, precision="fp16", formats="onnx,pt2", progress=False)
    return out


def test_fp16_export_passes_its_verification(fp16_pt2, packages, inputs):
    meta = load_package(fp16_pt2)
    assert meta.graph.precision == "fp16" and set(meta.files) == {"model.onnx", "model.pt2"}
    f16 = meta.verification["fp16"]
    assert f16["precision"] == "fp16" and f16["passed"] and f16["failures"] == []
    assert f16["top1_agreement_vs_fp32"] >= f16["min_top1_agreement"] == 0.98
    assert set(f16["max_accuracy_drop"]) == set(f16["accuracy_change"])  # every group bounded (3 points)
    assert all(d is None or d >= -f16["max_accuracy_drop"][k] for k, d in f16["accuracy_change"].items())
    assert f16["bytes"] < 0.75 * f16["bytes_fp32"]
    model = onnx.load(str(fp16_pt2 / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    got, ref = onnx_logits(fp16_pt2, inputs), onnx_logits(packages["ncm"], inputs)
    assert got.dtype == np.float32
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.98
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_pt2_program_matches_onnx(fp16_pt2, packages, inputs):
    program = torch.export.load(str(fp16_pt2 / "model.pt2")).module()
    with torch.no_grad():
        got = program(torch.from_numpy(inputs[:7])).numpy()
    ref = onnx_logits(packages["ncm"], inputs[:7])  # the fp32 ONNX of the same head
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    entry = load_package(fp16_pt2).files["model.pt2"]
    assert entry.sha256 == sha256_file(fp16_pt2 / "model.pt2")


def test_a_head_that_disagrees_with_its_parameters_writes_nothing(synth_run, copy_run, tmp_path):
    run = copy_run(synth_run)
    heads = RunPaths(run).heads
    h = load_head(heads, "tau_norm")
    save_head(CalibratedHead(h.weight, h.bias, "tau_norm", temperature=h.temperature,
                             meta={**h.meta, "tau": 0.3}), heads)  # its weights were folded with tau 0.7
    (tmp_path / "models").mkdir()
    out = tmp_path / "models" / "bad"
    with pytest.raises(PackageError, match="unfolded"):
        export_package(run, "tau_norm", out, progress=False)
    assert list((tmp_path / "models").iterdir()) == []  # no package, no temporary folder left behind


def _with_scales(run: Path, name: str, f: np.ndarray) -> None:
    """Rewrite heads/<name> (lws or lws+la) as if stage 2 had learnt the scales f (C,), folded consistently."""
    heads = RunPaths(run).heads
    h, joint = load_head(heads, name), load_head(heads, "joint")
    old = h.extras["scales"].astype(np.float64)
    bias = h.bias.astype(np.float64) + (f - old) * joint.bias  # lws+la keeps its - tau_la log pi; joint has no prior
    save_head(CalibratedHead(f[:, None] * joint.weight, bias, name, temperature=h.temperature, meta=h.meta,
                             extras={**h.extras, "scales": f.astype(np.float32)}), heads)


def test_lws_scales_non_positive_refuse_the_export_and_tiny_ones_are_recorded(tiny_rebalanced_run, copy_run,
                                                                               tmp_path):
    run = copy_run(tiny_rebalanced_run)
    f = load_head(RunPaths(run).heads, "lws").extras["scales"].astype(np.float64)
    negative = f.copy()
    negative[8] = -0.79  # what the paper's parameterisation learnt for a one-image class (rho 400)
    _with_scales(run, "lws+la", negative)
    with pytest.raises(PackageError, match=r"head 'lws\+la'.*non-positive.*'Bag' \(class 8, f=-0.79\)"):
        export_package(run, "lws+la", tmp_path / "neg", progress=False, verify_images=32)
    assert not (tmp_path / "neg").exists()
    tiny = f.copy()
    tiny[9] = 1e-3 * f.max()
    _with_scales(run, "lws", tiny)
    meta = export_package(run, "lws", tmp_path / "tiny", progress=False, verify_images=32)
    (warning,) = load_package(tmp_path / "tiny").verification["warnings"]
    assert "'Ankle boot' (class 9" in warning and meta.verification["warnings"] == [warning]
    assert load_package(tmp_path / "tiny").head.params["scales"]["min"] == pytest.approx(tiny.min(), rel=1e-6)


def test_test_metrics_are_recorded_whatever_the_command_order(tiny_rebalanced_run, copy_run, tmp_path):
    """train -> rebalance -> export (no `ltserve evaluate`) records test metrics computed from the cached test
    features; with eval/test.json the recorded numbers are used, and the same; a head re-fitted after the
    evaluation is computed again, not copied from the stale eval/test.json."""
    from ltserve.evaluate import evaluate_run
    from ltserve.features.cache import cached_features
    from ltserve.rebalance import rebalance

    run = copy_run(tiny_rebalanced_run)
    paths = RunPaths(run)
    shutil.rmtree(paths.eval, ignore_errors=True)
    info = read_run(run)
    tx, ty = cached_features(run, "test")

    def check(metrics: dict, source: str) -> None:
        assert "test" in metrics, f"model.json has no test metrics: {sorted(metrics)}"
        head = load_head(paths.heads, "tau_norm")
        want = classification_report(head.logits(tx), ty, info.class_counts, info.many_threshold, info.few_threshold)
        got = metrics["test"]
        for key in ("top1", "many", "medium", "few", "balanced_accuracy", "top5", "ece"):
            assert got[key] == pytest.approx(want[key], abs=1e-9), key
        assert got["n"] == len(ty) == 1000 and got["source"].startswith(source)

    meta = export_package(run, "tau_norm", tmp_path / "no-eval", progress=False, verify_images=32)
    check(meta.metrics, "computed at export")
    assert load_package(tmp_path / "no-eval").metrics == meta.metrics
    assert meta.metrics["val"]["source"] == "heads/tau_norm.json"

    recorded = evaluate_run(run, "test", plots=False)["heads"]["tau_norm"]
    meta = export_package(run, "tau_norm", tmp_path / "after-eval", progress=False, verify_images=32)
    check(meta.metrics, "eval/test.json")
    assert {k: v for k, v in meta.metrics["test"].items() if k != "source"} == recorded

    rebalance(run, heads="tau_norm", tau=1.5, progress=False)  # eval/test.json now describes the old head
    meta = export_package(run, "tau_norm", tmp_path / "refit", progress=False, verify_images=32)
    check(meta.metrics, "computed at export")


def test_cli_exports_the_best_head_and_refuses_bad_arguments(synth_run, tmp_path, capsys):
    from ltserve.cli import main

    out = tmp_path / "best"
    assert best_head(synth_run) == "tau_norm"  # val 0.61, the highest recorded
    assert main(["export", str(synth_run), "--head", "best", "--out", str(out), "--verify-images", "64"]) == 0
    meta = load_package(out)
    assert meta.head.name == "tau_norm" and meta.verification["inputs"]["images"] == 64
    assert meta.provenance.command.startswith("ltserve export ")
    assert "model.onnx" in capsys.readouterr().out
    for args, msg in [(["--head", "taunorm"], "did you mean 'tau_norm'"), (["--head", "la", "--opset", "17"], "opset"),
                      (["--head", "la", "--model-format", "pt2"], "always holds model.onnx"),
                      (["--head", "la", "--model-format", "onnx,tflite"], "--model-format 'tflite'")]:
        assert main(["export", str(synth_run), "--out", str(tmp_path / "x"), *args]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_best_head_reads_meta_then_eval_then_computes(tiny_rebalanced_run, synth_run, copy_run):
    from ltserve.features.cache import cached_features

    # the real run: stage-2 heads carry meta["val"]; the joint head has none, so it is computed on cached val features
    paths = RunPaths(tiny_rebalanced_run)
    info = read_run(tiny_rebalanced_run)
    vx, vy = cached_features(tiny_rebalanced_run, "val")
    scores = {h: load_head(paths.heads, h).meta.get("val", {}).get("balanced_accuracy") for h in HEAD_NAMES}
    joint = load_head(paths.heads, "joint")
    scores["joint"] = classification_report(joint.logits(vx), vy, info.class_counts)["balanced_accuracy"]
    assert best_head(tiny_rebalanced_run) == max(HEAD_NAMES, key=lambda h: (scores[h], -HEAD_NAMES.index(h)))
    # eval/val.json (written by `ltserve evaluate --split val`) is used when meta has no val
    run = copy_run(synth_run)
    heads = RunPaths(run).heads
    for name in HEAD_NAMES:
        h = load_head(heads, name)
        save_head(CalibratedHead(h.weight, h.bias, name, h.feature_transform, h.centre, h.temperature,
                                 {k: v for k, v in h.meta.items() if k != "val"}, h.extras), heads)
    RunPaths(run).eval.mkdir(exist_ok=True)
    (RunPaths(run).eval / "val.json").write_text(json.dumps(
        {"heads": {h: {"top1": 0.3, "balanced_accuracy": 0.9 if h == "lws" else 0.3} for h in HEAD_NAMES}}))
    assert best_head(run) == "lws"


def test_export_refuses_to_overwrite_a_folder_that_is_not_a_package(synth_run, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PackageError, match="not a model package"):
        export_package(synth_run, "joint", out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="--head 'nope'"):
        export_package(synth_run, "nope", tmp_path / "y", progress=False)


def test_export_replaces_an_older_package(synth_run, packages, tmp_path):
    out = tmp_path / "pkg"
    shutil.copytree(packages["synth/ncm"], out)
    meta = export_package(synth_run, "la", out, progress=False, verify_images=32)
    assert load_package(out).head.name == "la" == meta.head.name
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
