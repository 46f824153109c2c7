"""The head registry: one entry per method, read by config, stage 2, export and evaluation.

A method registered here, in the test, with its own settings, fit, reference logits, parameters, export check and
chosen value and nothing else, is validated by the config, fitted by `rebalance`, folded, checked and verified by
`export` (its parameter and its warning reach model.json), and reported by `evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ltserve.config import load_config
from ltserve.errors import ConfigError, PackageError
from ltserve.heads import HEADS, CalibratedHead, HeadMethod, raw_bias
from ltserve.heads.common import HeadFitter, MethodSettings
from ltserve.package import load_package

REPO = Path(__file__).resolve().parents[2]


class PowerNormSettings(MethodSettings):
    power: float = 0.5


class PowerNorm(HeadFitter):
    """A toy method: the joint rows divided by their norm to a power (tau-norm's shape, its own name and knob)."""

    Settings = PowerNormSettings
    name = "power_norm"

    def fit(self, train_features, train_labels, base_head, val):
        norms = np.linalg.norm(base_head.weight.astype(np.float64), axis=1, keepdims=True)
        return CalibratedHead(base_head.weight / norms ** self.settings.power, base_head.bias, self.name,
                              meta={"power": self.settings.power})


def power_norm_reference(head, joint, features, class_counts):
    w0 = joint.weight.astype(np.float64)
    w = w0 / np.linalg.norm(w0, axis=1, keepdims=True) ** head.meta["power"]
    return features @ w.T + raw_bias(joint)


def power_norm_params(head):
    return {"power": head.meta["power"]}


def power_norm_check(head, class_names):
    """A toy export check: a warning naming the class whose row the power shrinks most."""
    norms = np.linalg.norm(head.weight, axis=1)
    return [f"power {head.meta['power']:g} leaves {class_names[int(norms.argmin())]!r} the smallest row"]


def power_norm_chosen(meta):
    return [f"power={meta['power']:g}"]


POWER_NORM = HeadMethod("power_norm", power_norm_reference, PowerNorm, "power_norm", base="joint",
                        params=power_norm_params, check=power_norm_check, chosen=power_norm_chosen)


def joint_reference_only(head, joint, features, class_counts):
    """A wrong reference: it ignores what the method did to the rows."""
    return features @ joint.weight.astype(np.float64).T + raw_bias(joint)


def test_the_built_in_registry():
    assert HEADS.names() == ["joint", "crt", "tau_norm", "lws", "ncm", "la", "tau_norm+la", "lws+la"]
    assert HEADS.stage2() == HEADS.names()[1:]
    assert {n: HEADS.get(n).base for n in ("la", "tau_norm+la", "lws+la")} == \
        {"la": "joint", "tau_norm+la": "tau_norm", "lws+la": "lws"}
    # a composition inherits its base's checks and reports its base's choice with its own
    assert HEADS.get("lws+la").check is HEADS.get("lws").check
    plain = CalibratedHead(np.ones((2, 3)), np.zeros(2), "any")  # euclidean ncm folds up to a per-row constant only
    assert [n for n in HEADS.names() if not HEADS.get(n).exact(plain)] == ["ncm"]
    assert HEADS.get("tau_norm+la").chosen({"tau_la": 0.4, "base_meta": {"tau": 0.7}}) == ["tau=0.7", "tau_la=0.4"]
    assert [n for n in HEADS.names() if HEADS.get(n).trains] == ["crt", "lws"]
    assert set(HEADS.sections()) == {"crt", "tau_norm", "lws", "ncm", "la"}
    with pytest.raises(ConfigError, match="did you mean 'tau_norm'"):
        HEADS.get("taunorm")
    with pytest.raises(ValueError, match="already registered"):
        HEADS.register(HeadMethod("crt", power_norm_reference))
    with pytest.raises(ValueError, match="base 'nothing' is not registered"):
        HEADS.register(HeadMethod("x", power_norm_reference, PowerNorm, "x", base="nothing"))


def test_a_method_registered_here_runs_through_config_rebalance_export_and_evaluate(tiny_run, copy_run, tmp_path):
    from ltserve.evaluate import evaluate_run
    from ltserve.export import export_package
    from ltserve.rebalance import rebalance

    from ltserve.evaluate.tables import chosen_value

    run = copy_run(tiny_run)
    with HEADS.registered(POWER_NORM):
        cfg = load_config(REPO / "configs" / "tiny.yaml", ["rebalance.power_norm.power=0.25"])
        assert cfg.rebalance.power_norm.power == 0.25 and "power_norm" in cfg.rebalance.heads
        with pytest.raises(ConfigError, match=r"rebalance\.power_norm\.pow: unknown key; did you mean 'power'"):
            load_config(REPO / "configs" / "tiny.yaml", ["rebalance.power_norm.pow=1"])

        heads = rebalance(run, heads="power_norm", overrides=["rebalance.power_norm.power=0.25"], progress=False)
        head = heads["power_norm"]
        assert head.meta["power"] == 0.25 and head.meta["settings"] == {"power": 0.25}
        assert "calibration" in head.meta and head.meta["val"]["n"] > 0  # the stage's steps applied to it too

        meta = export_package(run, "power_norm", tmp_path / "pkg", verify_images=32, progress=False)
        assert meta.head.name == "power_norm"
        assert meta.verification["fp32"]["top1_agreement"] >= 0.99  # checked against the registered reference
        assert meta.verification["graph"]["head_ops"] == ["Gemm"]  # folded into the one Gemm
        written = load_package(tmp_path / "pkg")  # the method's own parameter and check, read back from model.json
        assert written.head.params["power"] == 0.25 and written.head.params["method"] == "power_norm"
        assert written.verification["warnings"] == power_norm_check(head, written.labels)
        assert chosen_value("power_norm", head.meta) == "power=0.25"

        results = evaluate_run(run, "test", plots=False)
        assert list(results["heads"]) == ["joint", "power_norm"]
    assert "power_norm" not in HEADS
    with pytest.raises(ConfigError, match="'power_norm' is not one of"):
        load_config(REPO / "configs" / "tiny.yaml", ["rebalance.heads=[power_norm]"])


def test_export_checks_a_head_against_the_reference_its_entry_registers(tiny_run, copy_run, tmp_path):
    """The same fit with a reference that ignores it: the folded graph no longer matches, and nothing is written."""
    from ltserve.export import export_package
    from ltserve.rebalance import rebalance

    run = copy_run(tiny_run)
    with HEADS.registered(HeadMethod("power_norm", joint_reference_only, PowerNorm, "power_norm", base="joint")):
        rebalance(run, heads="power_norm", progress=False)
        with pytest.raises(PackageError, match="unfolded"):
            export_package(run, "power_norm", tmp_path / "pkg", verify_images=32, progress=False)
    assert not (tmp_path / "pkg").exists()
