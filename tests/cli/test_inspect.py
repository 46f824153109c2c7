"""`ltserve inspect`: a package's summary, and a clear failure for a corrupted, swapped or missing file or an invalid
model.json (both in `inspect` and in `load_package`). inspect never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ltserve.cli import main
from ltserve.errors import PackageError
from ltserve.package import load_package


@pytest.fixture(scope="module")
def two_packages(tiny_package, tiny_rebalanced_run, tmp_path_factory) -> tuple[Path, Path]:
    """The shared tau_norm package of the tiny run, and its la head exported beside it."""
    from ltserve.export import export_package

    other = tmp_path_factory.mktemp("inspect") / "la"
    export_package(tiny_rebalanced_run, "la", other, progress=False, verify_images=64)
    return tiny_package, other


@pytest.fixture()
def pkg(two_packages, tmp_path) -> Path:
    """A fresh copy of the tau_norm package that a test may damage."""
    dst = tmp_path / "pkg"
    shutil.copytree(two_packages[0], dst)
    return dst


def test_inspect_shows_labels_head_metrics_preprocessing_and_files(two_packages, capsys):
    assert main(["inspect", str(two_packages[0])]) == 0
    out = capsys.readouterr().out
    meta = load_package(two_packages[0])
    val = meta.metrics["val"]
    for text in ("Ankle boot", f"head: tau_norm (temperature {meta.head.temperature:.4g})",
                 f"tau: {meta.head.params['tau']:.4g}", f"val (n={val['n']}): top1 {100 * val['top1']:.1f}",
                 "preprocess: resize 28", "mean [0.286]", "model.onnx", "ok", "OK: 1 file(s) verified"):
        assert text in out, text
    assert main(["inspect", str(two_packages[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\nOK:")[0])["head"]["name"] == "tau_norm"


def _damage_corrupt(p: Path, other: Path) -> None:
    data = bytearray((p / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    (p / "model.onnx").write_bytes(bytes(data))


def _damage_swap(p: Path, other: Path) -> None:
    shutil.copy(other / "model.onnx", p / "model.onnx")  # a valid model of another head


def _damage_missing(p: Path, other: Path) -> None:
    (p / "model.onnx").unlink()


@pytest.mark.parametrize("damage", [_damage_corrupt, _damage_swap, _damage_missing], ids=["corrupt", "swap", "missing"])
def test_a_damaged_model_onnx_fails_inspect_and_load_package(damage, pkg, two_packages, capsys):
    damage(pkg, two_packages[1])
    assert main(["inspect", str(pkg)]) == 2
    err = capsys.readouterr().err
    assert str(pkg / "model.onnx") in err and "re-export" in err
    with pytest.raises(PackageError, match="model.onnx"):
        load_package(pkg)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"name": "x"}), ""], ids=["syntax", "schema", "empty"])
def test_an_invalid_model_json_fails_inspect_and_load_package(text, pkg, capsys):
    (pkg / "model.json").write_text(text)
    assert main(["inspect", str(pkg)]) == 2
    assert f"{pkg / 'model.json'}: invalid model.json" in capsys.readouterr().err
    with pytest.raises(PackageError, match="model.json"):
        load_package(pkg)


def test_inconsistent_model_json_and_missing_package(pkg, tmp_path, capsys):
    meta = json.loads((pkg / "model.json").read_text())
    meta["labels"] = meta["labels"][:-1]  # one label fewer than class_counts
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="same length"):
        load_package(pkg)
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "model package not found" in capsys.readouterr().err


def test_inspect_imports_no_torch(two_packages):
    code = ("import sys; from ltserve.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, 'torch imported'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(two_packages[0])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK: 1 file(s) verified" in proc.stdout
