"""Stage 2: every re-balancing method against a direct computation, and `ltserve rebalance` on a real tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ltserve.errors import ConfigError
from ltserve.heads import HEADS, CalibratedHead, apply_target_prior, load_head, save_head, strip_target_prior
from ltserve.heads.calibrate import calibrate, fit_temperature, nll
from ltserve.heads.crt import CRT
from ltserve.heads.la import LogitAdjustment
from ltserve.heads.lws import LWS, scaled_linear
from ltserve.heads.ncm import NCM
from ltserve.heads.tau_norm import TauNorm, tau_normalise
from ltserve.rebalance import apply_rebalance_overrides, resolve_heads
from ltserve.rebalance.prior import read_prior_file, target_log_prior

C, D = 6, 8
COUNTS = [120, 60, 30, 12, 6, 3]
METHODS = ["crt", "tau_norm", "lws", "ncm", "la", "tau_norm+la", "lws+la"]  # canonical order


# ----------------------------------------------------------------------------------------------------------------
# Synthetic tensors: class means with a long tail of counts, and a "joint" head biased towards the head classes
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(C, D)) * 1.5
    y = np.repeat(np.arange(C), COUNTS)
    x = (means[y] + rng.normal(size=(len(y), D))).astype(np.float32)
    vy = np.repeat(np.arange(C), 15)
    vx = (means[vy] + rng.normal(size=(len(vy), D))).astype(np.float32)
    # a joint head whose norms and biases grow with the class count, as stage 1 on long-tailed data leaves them
    scale = np.log(np.asarray(COUNTS, dtype=np.float64))[:, None]
    joint = CalibratedHead(weight=means * scale / 3 + rng.normal(size=(C, D)) * 0.1,
                           bias=np.log(np.asarray(COUNTS) / sum(COUNTS)), method="joint")
    return {"x": x, "y": y, "val": (vx, vy), "joint": joint}


def make(name: str):
    """The method object of head `name`, small and on CPU."""
    if name == "crt":
        return CRT(epochs=4, lr=0.1, batch_size=32, device="cpu", progress=False)
    if name == "lws":
        return LWS(epochs=4, lr=0.1, batch_size=32, device="cpu", progress=False)
    if name == "tau_norm":
        return TauNorm()
    if name == "ncm":
        return NCM()
    return LogitAdjustment()


def fit(name: str, synth) -> CalibratedHead:
    base = synth["joint"]
    if name in ("tau_norm+la", "lws+la"):
        base = fit(HEADS.get(name).base, synth)
    return make(name).fit(synth["x"], synth["y"], base, val=synth["val"])


def joint_logits(synth, x) -> np.ndarray:
    j = synth["joint"]
    return x.astype(np.float64) @ j.weight.T.astype(np.float64) + j.bias


# ----------------------------------------------------------------------------------------------------------------
# One contract over every method
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name, synth, tmp_path):
    head = fit(name, synth)
    assert head.method == name
    assert head.weight.shape == (C, D) and head.bias.shape == (C,)
    assert head.temperature == 1.0
    vx = synth["val"][0]
    assert np.isfinite(head.logits(vx)).all()
    # fitting twice gives the same head
    again = fit(name, synth)
    np.testing.assert_array_equal(head.weight, again.weight)
    np.testing.assert_array_equal(head.bias, again.bias)
    # meta is JSON and the head survives a save/load round trip
    json.dumps(head.meta)
    save_head(head, tmp_path)
    loaded = load_head(tmp_path, name)
    np.testing.assert_array_equal(loaded.logits(vx), head.logits(vx))
    assert loaded.meta["fit_seconds"] >= 0


@pytest.mark.parametrize("name", ["crt", "lws"])
def test_trained_heads_pick_their_best_val_epoch(name, synth):
    head = fit(name, synth)
    curve = head.meta["epochs_curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3, 4]
    scores = [p["score"] for p in curve]
    assert head.meta["best_epoch"] == 1 + int(np.argmax(scores))
    # the returned head is that epoch's: its val score is the recorded one
    vx, vy = synth["val"]
    pred = head.logits(vx).argmax(1)
    assert np.mean(pred == vy) == pytest.approx(scores[head.meta["best_epoch"] - 1])
    assert head.meta["selection_metric"] == "top1"  # the synthetic val split is balanced


def test_crt_depends_on_seed(synth):
    a = CRT(epochs=2, batch_size=32, device="cpu", progress=False, seed=0).fit(synth["x"], synth["y"], synth["joint"],
                                                                              synth["val"])
    b = CRT(epochs=2, batch_size=32, device="cpu", progress=False, seed=1).fit(synth["x"], synth["y"], synth["joint"],
                                                                              synth["val"])
    assert not np.array_equal(a.weight, b.weight)


def test_crt_lifts_the_tail_on_separable_data(synth):
    """Class-balanced re-training must beat a joint head biased towards the head classes on the tail."""
    head = CRT(epochs=10, lr=0.1, batch_size=32, device="cpu", progress=False).fit(
        synth["x"], synth["y"], synth["joint"], synth["val"])
    vx, vy = synth["val"]
    tail = vy >= 3
    joint_tail = np.mean(joint_logits(synth, vx).argmax(1)[tail] == vy[tail])
    crt_tail = np.mean(head.logits(vx).argmax(1)[tail] == vy[tail])
    assert crt_tail > joint_tail


# ----------------------------------------------------------------------------------------------------------------
# Each head against its formula
# ----------------------------------------------------------------------------------------------------------------


def test_tau_norm_tau0_keep_bias_is_joint(synth):
    head = TauNorm(tau=0.0, keep_bias=True).fit(None, synth["y"], synth["joint"], synth["val"])
    vx = synth["val"][0]
    np.testing.assert_allclose(head.logits(vx), joint_logits(synth, vx), rtol=1e-5, atol=1e-5)
    assert head.meta["tau"] == 0.0 and head.meta["tau_source"] == "fixed"


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.7])
def test_tau_norm_formula(tau, synth):
    head = TauNorm(tau=tau).fit(None, synth["y"], synth["joint"], synth["val"])
    w = synth["joint"].weight.astype(np.float64)
    expected = w / np.linalg.norm(w, axis=1, keepdims=True) ** tau
    np.testing.assert_allclose(head.weight, expected, rtol=1e-5)
    np.testing.assert_array_equal(head.bias, np.zeros(C))  # the bias is dropped by default
    if tau == 1.0:
        np.testing.assert_allclose(np.linalg.norm(head.weight, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(head.extras["base_norms"], np.linalg.norm(w, axis=1), rtol=1e-5)


def test_tau_normalise_zero_row_stays_finite():
    w, b = tau_normalise(np.zeros((2, 3)), np.ones(2), tau=1.0, keep_bias=True)
    assert np.isfinite(w).all() and (w == 0).all() and (b == 1).all()


def test_lws_with_unit_scales_is_joint(synth):
    import torch

    j = synth["joint"]
    module = scaled_linear(j.weight, j.bias)
    assert [name for name, _ in module.named_parameters()] == ["log_scales"]  # f = exp(s): positive by construction
    assert torch.equal(module.log_scales.detach(), torch.zeros(C))
    assert torch.equal(module.scales.detach(), torch.ones(C))
    vx = synth["val"][0]
    out = module(torch.as_tensor(vx)).detach().numpy()
    np.testing.assert_allclose(out, joint_logits(synth, vx), rtol=1e-5, atol=1e-5)


def test_lws_formula_scales_weight_and_bias(synth):
    head = fit("lws", synth)
    f = head.extras["scales"].astype(np.float64)
    assert not np.allclose(f, 1.0)  # it learnt something
    vx = synth["val"][0]
    np.testing.assert_allclose(head.logits(vx), f * joint_logits(synth, vx), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.bias, f * synth["joint"].bias, rtol=1e-6)


TAIL_COUNTS = [200, 100, 40, 10, 1]


def one_image_tail(seed: int) -> dict:
    """Non-negative (post-ReLU-like) features of 5 classes, the rarest with ONE training image, and a joint head
    fitted to them by instance-balanced softmax regression, which leaves the rarest class's logit negative on its
    own image: the case in which plain LWS scales turn negative (Fashion-MNIST-LT, rho 400)."""
    rng = np.random.default_rng(seed)
    c, d = len(TAIL_COUNTS), 8
    means = np.abs(rng.normal(size=(c, d)))

    def draw(labels: np.ndarray) -> np.ndarray:
        return np.maximum(means[labels] + rng.normal(size=(len(labels), d)) * 0.5, 0).astype(np.float32)

    y = np.repeat(np.arange(c), TAIL_COUNTS)
    x = draw(y)
    vy = np.repeat(np.arange(c), 20)
    vx = draw(vy)
    w, b = np.zeros((c, d)), np.zeros(c)
    for _ in range(300):  # full-batch gradient descent on the softmax cross-entropy, weight decay 1e-2
        z = x @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        w -= 0.5 * (p.T @ x / len(y) + 1e-2 * w)
        b -= 0.5 * p.mean(0)
    joint = CalibratedHead(weight=w, bias=b, method="joint")
    assert (x[y == c - 1] @ w[-1] + b[-1] < 0).all()  # the rarest class scores below 0 on its own image
    return {"x": x, "y": y, "val": (vx, vy), "joint": joint}


def plain_scales(data: dict, lws: LWS) -> np.ndarray:
    """The paper's parameterisation, f learnt directly (initialised to 1), trained by the same loop as LWS."""
    import torch
    from torch import nn

    joint = data["joint"]

    class PlainScales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.as_tensor(joint.weight))
            self.register_buffer("bias", torch.as_tensor(joint.bias))
            self.scales = nn.Parameter(torch.ones(len(joint.bias)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scales * (x @ self.weight.T + self.bias)

    state, _ = lws.fit_module(PlainScales(), data["x"], data["y"], joint, data["val"])
    return state["scales"].numpy()


@pytest.mark.parametrize("seed,tiny", [(2, []), (1, [4])])
def test_lws_scales_stay_positive_where_plain_scales_turn_negative(seed, tiny, caplog):
    data = one_image_tail(seed)
    lws = LWS(epochs=5, lr=0.2, batch_size=32, device="cpu", progress=False)
    assert plain_scales(data, lws)[-1] < 0  # the defect, reproduced: the one-image class gets a negative scale
    with caplog.at_level("WARNING", logger="ltserve.heads.lws"):
        head = lws.fit(data["x"], data["y"], data["joint"], val=data["val"])
    f = head.extras["scales"].astype(np.float64)
    assert (f > 0).all() and np.isfinite(f).all() and not np.allclose(f, 1.0)
    # still folded as W'_j = f_j W_j, b'_j = f_j b_j
    joint = data["joint"]
    np.testing.assert_allclose(head.weight, f[:, None] * joint.weight, rtol=1e-5)
    np.testing.assert_allclose(head.bias, f * joint.bias, rtol=1e-5)
    vx = data["val"][0]
    np.testing.assert_allclose(head.logits(vx), HEADS.get("lws").reference(head, joint, vx, TAIL_COUNTS),
                               rtol=1e-4, atol=1e-4)
    # a tiny scale (below TINY_SCALE x the largest) is warned about and recorded; a healthy head has no warning
    from ltserve.heads.lws import TINY_SCALE, scale_check

    check = head.meta["scale_check"]
    assert check == scale_check(f) and check["tiny"] == tiny and check["non_positive"] == []
    assert all(f[j] < TINY_SCALE * f.max() for j in tiny)
    assert head.meta["warnings"] == check["warnings"] and bool(head.meta["warnings"]) == bool(tiny)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == len(check["warnings"]) and all(f"class {j} " in " ".join(warned) for j in tiny)
    json.dumps(head.meta)


def test_scale_check_flags_non_positive_and_tiny_scales():
    from ltserve.heads.lws import scale_check

    check = scale_check(np.array([2.0, 1.0, 0.05, -0.3, 0.0]), ["a", "b", "c", "d", "e"])
    assert check["non_positive"] == [3, 4] and check["tiny"] == [2] and len(check["warnings"]) == 2
    assert "'d' (class 3, f=-0.3)" in check["warnings"][0] and "'c' (class 2, f=0.05)" in check["warnings"][1]
    assert scale_check(np.array([1.0, 0.2]))["warnings"] == []


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ncm_formula(metric, synth):
    x, y = synth["x"], synth["y"]
    head = NCM(metric=metric).fit(x, y, synth["joint"])
    mu = x.astype(np.float64).mean(0)
    xn = (x - mu) / np.linalg.norm(x - mu, axis=1, keepdims=True)
    centroids = np.stack([xn[y == j].mean(0) for j in range(C)])  # not re-normalised
    vx = synth["val"][0].astype(np.float64)
    vn = (vx - mu) / np.linalg.norm(vx - mu, axis=1, keepdims=True)
    logits = head.logits(vx).astype(np.float64)
    assert head.feature_transform == "centred_l2"
    np.testing.assert_allclose(head.centre, mu, rtol=1e-5)
    if metric == "euclidean":
        neg_d2 = -((vn[:, None, :] - centroids[None]) ** 2).sum(-1)
        diff = logits - neg_d2  # equal up to a per-row constant (||x'||^2 = 1 here)
        np.testing.assert_allclose(diff, diff[:, :1].repeat(C, 1), atol=1e-4)
        assert np.array_equal(logits.argmax(1), neg_d2.argmax(1))
    else:
        unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        np.testing.assert_allclose(logits, vn @ unit.T, atol=1e-5)


def test_ncm_needs_every_class(synth):
    x, y = synth["x"], synth["y"].copy()
    keep = y != 4
    with pytest.raises(ValueError, match=r"classes \[4\] have no training image"):
        NCM().fit(x[keep], y[keep], synth["joint"])


@pytest.mark.parametrize("name", ["la", "tau_norm+la", "lws+la"])
def test_logit_adjustment_formula(name, synth):
    head = fit(name, synth)
    tau_la = head.meta["tau_la"]
    log_pi = np.log(np.asarray(COUNTS) / sum(COUNTS))
    vx = synth["val"][0].astype(np.float64)
    j = synth["joint"]
    if name == "la":
        expected = joint_logits(synth, vx) - tau_la * log_pi
    elif name == "tau_norm+la":
        tau = head.meta["base_meta"]["tau"]
        w = j.weight.astype(np.float64)
        w = w / np.linalg.norm(w, axis=1, keepdims=True) ** tau
        expected = vx @ w.T - tau_la * log_pi  # tau_norm drops the bias by default
    else:
        f = head.extras["scales"].astype(np.float64)
        expected = f * (vx @ j.weight.T.astype(np.float64)) + f * j.bias - tau_la * log_pi
    np.testing.assert_allclose(head.logits(vx), expected, rtol=1e-4, atol=1e-4)
    assert head.meta["base"] == HEADS.get(name).base
    np.testing.assert_allclose(head.extras["log_prior"], log_pi, rtol=1e-6)


@pytest.mark.parametrize("name,knob", [("tau_norm", "tau"), ("la", "tau_la"), ("tau_norm+la", "tau_la")])
def test_sweep_picks_the_argmax_of_its_curve(name, knob, synth):
    head = fit(name, synth)
    curve = head.meta["sweep"]
    scores = [p["score"] for p in curve]
    assert head.meta[knob] == curve[int(np.argmax(scores))][knob]
    assert len(set(scores)) > 1  # the curve moves: the choice is not vacuous
    for p in curve:
        assert set(p) >= {knob, "score", "top1", "balanced_accuracy", "many", "medium", "few"}
    # the recorded score at the chosen value is what the head scores on val
    vx, vy = synth["val"]
    assert np.mean(head.logits(vx).argmax(1) == vy) == pytest.approx(max(scores))


def test_fixed_tau_overrides_the_sweep(synth):
    head = TauNorm(tau=0.35).fit(None, synth["y"], synth["joint"], synth["val"])
    assert head.meta["tau"] == 0.35 and head.meta["tau_source"] == "fixed"
    assert 0.35 in [p["tau"] for p in head.meta["sweep"]]


def test_sweep_uses_balanced_accuracy_on_an_unbalanced_val(synth):
    vx, vy = synth["val"]
    keep = np.ones(len(vy), bool)
    keep[np.flatnonzero(vy == 0)[:10]] = False
    head = TauNorm().fit(None, synth["y"], synth["joint"], (vx[keep], vy[keep]))
    assert head.meta["selection_metric"] == "balanced_accuracy"
    assert all(p["score"] == p["balanced_accuracy"] for p in head.meta["sweep"])


def test_fit_rejects_mismatched_features(synth):
    with pytest.raises(ValueError, match=r"val features must be \(N, 8\)"):
        TauNorm().fit(None, synth["y"], synth["joint"], (np.zeros((5, 3)), np.zeros(5, int)))
    with pytest.raises(ValueError, match="labels must lie in"):
        NCM().fit(synth["x"], synth["y"] + 1, synth["joint"])


# ----------------------------------------------------------------------------------------------------------------
# Calibration and target prior
# ----------------------------------------------------------------------------------------------------------------


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 5)) * 2.0
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(true_logits * 3.0, labels)  # logits 3x too sharp: T should be ~3
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(true_logits * 3.0, labels, t) < nll(true_logits * 3.0, labels, 1.0)


@pytest.mark.parametrize("name", METHODS)
def test_temperature_keeps_argmax_and_never_raises_val_ece_or_nll(name, synth):
    head = fit(name, synth)
    vx, vy = synth["val"]
    cal = calibrate(head, vx, vy)
    np.testing.assert_array_equal(cal.logits(vx).argmax(1), head.logits(vx).argmax(1))
    info = cal.meta["calibration"]
    assert info["fitted_temperature"] != 1.0
    assert info["applied"] == (info["val_ece_fitted"] < info["val_ece_before"])
    assert cal.temperature == info["temperature"] == (info["fitted_temperature"] if info["applied"] else 1.0)
    assert info["val_ece_after"] <= info["val_ece_before"]
    assert info["val_nll_after"] <= info["val_nll_before"] + 1e-9
    w, b = cal.folded()
    np.testing.assert_allclose(w, head.weight / cal.temperature, rtol=1e-6)


def identity_head(num_classes: int) -> CalibratedHead:
    """A head whose logits are its input features: calibrating it on (logits, labels) calibrates those logits."""
    return CalibratedHead(weight=np.eye(num_classes), bias=np.zeros(num_classes), method="crt")


def test_calibration_is_applied_when_it_lowers_val_ece():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 5)) * 2.0
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    cal = calibrate(identity_head(5), true_logits * 3.0, labels)  # 3x over-confident
    info = cal.meta["calibration"]
    assert info["applied"] and cal.temperature == info["fitted_temperature"] == pytest.approx(3.0, rel=0.1)
    assert info["val_ece_after"] == info["val_ece_fitted"] < info["val_ece_before"]
    assert info["decision"].startswith("applied T = ")


def test_calibration_keeps_t1_when_the_nll_fit_would_raise_val_ece():
    """Calibrated logits (conf 0.95, 95 % right) plus 3 confidently wrong images: the NLL-optimal T (~1.28) softens
    everything to spare those 3, and the ECE of the other 1000 rises; T = 1 is kept."""
    margin = np.log(0.95 / 0.05)
    logits = np.r_[np.tile([margin, 0.0], (1000, 1)), np.tile([40.0, 0.0], (3, 1))]
    labels = np.r_[np.zeros(950, np.int64), np.ones(53, np.int64)]
    head = identity_head(2)
    cal = calibrate(head, logits, labels)
    assert cal.temperature == 1.0
    info = cal.meta["calibration"]
    assert info["fitted_temperature"] == pytest.approx(1.28, abs=0.01)
    assert info["val_nll_fitted"] < info["val_nll_before"]  # the fit did what it optimises ...
    assert info["val_ece_fitted"] > info["val_ece_before"]  # ... and made the ECE worse
    assert info["temperature"] == 1.0 and not info["applied"]
    assert (info["val_ece_after"], info["val_nll_after"]) == (info["val_ece_before"], info["val_nll_before"])
    assert info["decision"].startswith("kept T = 1")
    np.testing.assert_array_equal(cal.logits(logits), head.logits(logits))


def test_target_prior_uniform_train_and_file(synth, tmp_path):
    head = fit("tau_norm", synth)
    names = [f"c{j}" for j in range(C)]
    lp, info = target_log_prior("uniform", COUNTS, names)
    assert lp is None and info == {"kind": "uniform"}
    assert np.array_equal(apply_target_prior(head, lp, info).bias, head.bias)

    lp, info = target_log_prior("train", COUNTS, names)
    shifted = apply_target_prior(head, lp, info)
    np.testing.assert_allclose(shifted.bias, head.bias + np.log(np.asarray(COUNTS) / sum(COUNTS)), rtol=1e-6)
    assert shifted.meta["target_prior"]["kind"] == "train"
    np.testing.assert_allclose(strip_target_prior(shifted).bias, head.bias, atol=1e-6)

    txt = tmp_path / "prior.txt"
    txt.write_text("1 1 2\n2 2 2\n")
    np.testing.assert_allclose(read_prior_file(txt, names), np.array([1, 1, 2, 2, 2, 2]) / 10)
    js = tmp_path / "prior.json"
    js.write_text(json.dumps({"c0": 3, "c5": 1}))
    np.testing.assert_allclose(read_prior_file(js, names), [0.75, 0, 0, 0, 0, 0.25])
    lp, info = target_log_prior(str(js), COUNTS, names)
    assert np.isfinite(lp).all() and info["kind"] == "file"
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ConfigError, match="3 weights for 6 classes"):
        read_prior_file(bad, names)
    with pytest.raises(ConfigError, match="unknown class names"):
        js.write_text(json.dumps({"nope": 1}))
        read_prior_file(js, names)


# ----------------------------------------------------------------------------------------------------------------
# Orchestration helpers and report
# ----------------------------------------------------------------------------------------------------------------


def test_resolve_heads_and_overrides(tiny_config):
    assert resolve_heads("lws+la,crt", []) == ["crt", "lws+la"]
    assert resolve_heads("all", []) == METHODS
    assert resolve_heads(None, ["ncm"]) == ["ncm"]
    with pytest.raises(ConfigError, match="did you mean 'tau_norm'"):
        resolve_heads("taunorm", [])
    cfg = apply_rebalance_overrides(tiny_config, ["rebalance.crt.epochs=3", "tau_norm.keep_bias=true"])
    assert cfg.rebalance.crt.epochs == 3 and cfg.rebalance.tau_norm.keep_bias is True
    with pytest.raises(ConfigError, match="only changes the rebalance section"):
        apply_rebalance_overrides(tiny_config, ["train.epochs=3"])
    with pytest.raises(ConfigError, match="unknown key"):
        apply_rebalance_overrides(tiny_config, ["rebalance.crt.epoch=3"])


def test_report_pngs_and_table(synth, tmp_path):
    from ltserve.evaluate.figures import plot_per_class_accuracy, plot_tau_sweep, plot_weight_norms
    from ltserve.evaluate.selection import best_of
    from ltserve.evaluate.tables import heads_table
    from ltserve.metrics import classification_report

    tau = fit("tau_norm", synth)
    lws = fit("lws", synth)
    vx, vy = synth["val"]
    reports = {name: classification_report(h.logits(vx), vy, COUNTS, 50, 10)
               for name, h in {"joint": synth["joint"], "tau_norm": tau, "lws": lws}.items()}
    names = [f"class {j}" for j in range(C)]
    pngs = [plot_tau_sweep(tmp_path / "sweep.png", tau.meta),
            plot_tau_sweep(tmp_path / "la_sweep.png", fit("la", synth).meta),
            plot_weight_norms(tmp_path / "norms.png", names, COUNTS,
                              {"joint": synth["joint"].weight, "tau_norm": tau.weight, "lws": lws.weight}),
            plot_per_class_accuracy(tmp_path / "per_class.png", names, COUNTS,
                                    {h: reports[h]["per_class"] for h in ("joint", "tau_norm")})]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="no sweep"):
        plot_tau_sweep(tmp_path / "x.png", lws.meta)
    table = heads_table(reports, columns=("many", "medium", "few", "top1"))
    lines = table.splitlines()
    assert lines[0] == "| head | Many | Medium | Few | All |" and len(lines) == 5
    assert lines[3].startswith("| tau_norm | ")
    assert best_of(reports)[0] in ("tau_norm", "lws")
    assert "empty" in heads_table({"x": {"many": None, "medium": 0.5, "few": 0.25, "top1": 0.4}})


# ----------------------------------------------------------------------------------------------------------------
# On a real run (configs/tiny.yaml): files, invariants, and the paper's qualitative result
# ----------------------------------------------------------------------------------------------------------------

PROTECTED = ("run.json", "backbone.safetensors", "heads/joint.safetensors", "heads/joint.json")


def _hashes(run: Path) -> dict[str, str]:
    from ltserve.fileio import sha256_file

    return {p: sha256_file(run / p) for p in PROTECTED}


def test_rebalance_all_heads_on_a_real_run(tiny_run, copy_run, capsys):
    from ltserve.cli.rebalance import cli
    from ltserve.evaluate import evaluate_run
    from ltserve.heads import list_heads

    run = copy_run(tiny_run)
    before = _hashes(run)
    assert cli([str(run), "--heads", "all", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert _hashes(run) == before  # run.json, backbone and joint head untouched
    assert list_heads(run / "heads") == ["joint", *METHODS]
    for name in METHODS:
        head = load_head(run / "heads", name)
        meta = head.meta
        assert head.temperature > 0 and "calibration" in meta
        assert {"val", "fit_seconds", "settings", "target_prior", "backbone_sha256"} <= set(meta)
        assert meta["val"]["n"] > 0 and 0.0 <= meta["val"]["top1"] <= 1.0
        assert f"| {name} |" in out
    assert "| joint |" in out and "All" in out

    # the stage-2 figures of `ltserve evaluate`, drawn from what the heads recorded
    files = evaluate_run(run, "val")["files"]
    assert {"sweep_tau_norm_png", "sweep_la_png", "sweep_tau_norm_la_png", "sweep_lws_la_png"} <= set(files)
    for key, png in files.items():
        if key.endswith("_png"):
            assert Path(png).parent == run / "eval" and Path(png).read_bytes()[:4] == b"\x89PNG"
    assert _hashes(run) == before


def test_rebalance_fits_a_missing_base_and_reuses_a_saved_one(tiny_run, copy_run):
    from ltserve.rebalance import rebalance

    run = copy_run(tiny_run)
    written = rebalance(run, heads="tau_norm+la", tau=0.5, progress=False)
    assert set(written) == {"tau_norm", "tau_norm+la"}  # the missing base is fitted and saved first
    assert written["tau_norm"].meta["tau"] == 0.5
    assert written["tau_norm+la"].meta["base_meta"]["tau"] == 0.5
    # a later invocation builds on the saved tau_norm (tau 0.5), not on a new sweep
    again = rebalance(run, heads="tau_norm+la", target_prior="train", progress=False)
    assert set(again) == {"tau_norm+la"}
    head = again["tau_norm+la"]
    assert head.meta["base_meta"]["tau"] == 0.5 and head.meta["target_prior"]["kind"] == "train"
    np.testing.assert_allclose(head.extras["target_log_prior"],
                               np.log(np.asarray(head.meta["target_prior"]["weights"])), rtol=1e-5)


def test_no_cache_feeds_augmented_images(tiny_run, copy_run):
    from ltserve.rebalance import rebalance

    run = copy_run(tiny_run)
    before = _hashes(run)
    heads = rebalance(run, heads="crt,lws", use_cache=False, overrides=["crt.epochs=2", "lws.epochs=2"],
                      progress=False)
    for name in ("crt", "lws"):
        assert heads[name].meta["features"] == "augmented"
        assert heads[name].meta["train_features"] == "augmented"
        assert len(heads[name].meta["epochs_curve"]) == 2
    assert _hashes(run) == before


def test_rebalance_twice_gives_the_same_heads(tiny_run, copy_run, tmp_path):
    import shutil

    from ltserve.rebalance import rebalance

    a = rebalance(copy_run(tiny_run), heads="crt,lws,ncm", progress=False)
    b_run = tmp_path / "second"
    shutil.copytree(tiny_run, b_run)
    b = rebalance(b_run, heads="crt,lws,ncm", progress=False)
    for name in a:
        np.testing.assert_array_equal(a[name].weight, b[name].weight)
        np.testing.assert_array_equal(a[name].bias, b[name].bias)
        assert a[name].temperature == b[name].temperature


def test_errors_name_the_fix(tmp_path, tiny_run, copy_run):
    from ltserve.errors import RunError
    from ltserve.rebalance import rebalance

    with pytest.raises(RunError, match="ltserve train"):
        rebalance(tmp_path / "nope")
    run = copy_run(tiny_run)
    with pytest.raises(ConfigError, match="did you mean"):
        rebalance(run, heads="lsw")
    bad = tmp_path / "prior.txt"
    bad.write_text("1 2")
    with pytest.raises(ConfigError, match="2 weights for 10 classes"):
        rebalance(run, heads="ncm", target_prior=str(bad), progress=False)
    assert not (run / "heads" / "ncm.json").exists()  # failed before fitting anything


def test_lws_on_the_real_run_learns_positive_scales(tiny_rebalanced_run):
    from ltserve.features.cache import cached_features
    from ltserve.heads.lws import scale_check

    heads = tiny_rebalanced_run / "heads"
    joint, lws = load_head(heads, "joint"), load_head(heads, "lws")
    f = lws.extras["scales"].astype(np.float64)
    assert (f > 0).all() and not np.allclose(f, 1.0)
    assert lws.meta["scale_check"] == scale_check(f)
    np.testing.assert_allclose(lws.weight, f[:, None] * joint.weight, rtol=1e-5)
    assert load_head(heads, "lws+la").extras["scales"].tolist() == lws.extras["scales"].tolist()
    vx, vy = cached_features(tiny_rebalanced_run, "val")
    assert lws.meta["val"]["top1"] == pytest.approx(float(np.mean(lws.logits(vx).argmax(1) == vy)))


def test_few_shot_accuracy_rises_over_joint(tiny_rebalanced_run):
    """The paper's qualitative result on the tiny Fashion-MNIST-LT run: tau_norm and crt beat joint on few-shot.

    tau-norm only rescales the joint rows, so it needs a stage 1 long enough for the tail rows to point at their
    classes: after 4 epochs (28 steps) the few-shot rows still point away from the (non-negative, post-ReLU)
    features and no tau helps (few-shot 0 % at every tau); from ~10 epochs on, the result shows (12: 29 vs 17 %).
    """
    from ltserve.features.cache import cached_features
    from ltserve.metrics import classification_report
    from ltserve.rundir import read_run

    info = read_run(tiny_rebalanced_run)
    tx, ty = cached_features(tiny_rebalanced_run, "test")
    few = {}
    for name in ("joint", "tau_norm", "crt"):
        head = load_head(tiny_rebalanced_run / "heads", name)
        rep = classification_report(head.logits(tx), ty, info.class_counts, info.many_threshold, info.few_threshold)
        few[name] = rep["few"]
    assert few["joint"] is not None
    why = (f"few-shot test accuracy {few}; tau_norm cannot beat joint when stage 1 is too short for the tail rows "
           "to point at their classes: configs/tiny.yaml needs train.epochs >= 10")
    assert few["tau_norm"] > few["joint"], why
    assert few["crt"] > few["joint"], few
