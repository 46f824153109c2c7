"""`ltserve bento`: a Bento per model package, built from a fresh export, served from outside the repository.

The Bento is built into a BentoML store in a temporary BENTOML_HOME (never the user's ~/bentoml) by the CLI in a
child process, then served with `bentoml serve NAME:VERSION` from a temporary working directory, beside the
repository's service on the same package; both answer the same image.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from ltserve.cli.bento import (ENTRY, TORCH_ENVS, pinned_requirements, plan_bento, read_constraints,
                               serving_sources)
from ltserve.errors import PackageError
from ltserve.serve.process import ServerProcess
from package_helpers import build_random_rgb_package, read_fashion

REPO = Path(__file__).resolve().parents[2]


def _ltserve(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ltserve.cli", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


@pytest.fixture(scope="module")
def built(tiny_package, bento_home, tmp_path_factory) -> tuple[str, Path]:
    """The ONNX Runtime Bento of the tiny run's freshly exported package: (tag, the Bento's folder)."""
    cwd = tmp_path_factory.mktemp("build_cwd")
    done = _ltserve(["bento", str(tiny_package)], cwd, {"BENTOML_HOME": str(bento_home)})
    assert done.returncode == 0, done.stdout + done.stderr
    tag = done.stdout.split("built: ", 1)[1].split()[0]
    name, version = tag.split(":")
    return tag, bento_home / "bentos" / name / version


def test_the_bento_holds_the_package_and_the_serving_code_only(built, tiny_package):
    tag, path = built
    info = yaml.safe_load((path / "bento.yaml").read_text())
    meta = yaml.safe_load((tiny_package / "model.json").read_text())
    sha = hashlib.sha256((tiny_package / "model.json").read_bytes()).hexdigest()
    assert tag == f"{meta['name'].lower()}:{sha[:12]}"
    assert info["labels"]["package_sha256"] == sha and info["labels"]["backend"] == "onnxruntime"
    assert info["service"] == f"{ENTRY}:Classifier"
    assert {e["name"]: e["value"] for e in info["envs"]} == {"LTSERVE_MODEL": f"models/{tiny_package.name}"}
    src = path / "src"
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    package_files = sorted(f"models/{tiny_package.name}/{n}" for n in ["model.json", *meta["files"]])
    assert files == sorted(["bentofile.yaml", f"{ENTRY}.py", *serving_sources(), *package_files])
    assert not any(f.startswith(("ltserve/train", "ltserve/export", "ltserve/features", "ltserve/cli"))
                   for f in files)
    # every requirement pinned exactly, to the tested versions, torch-free
    reqs = [r for r in (path / "env/python/requirements.txt").read_text().splitlines() if r and not r[0] == "#"]
    assert reqs and all("==" in r for r in reqs), reqs
    pins = read_constraints()
    pinned = dict(r.split("==") for r in reqs)
    assert pinned["bentoml"] == pins["bentoml"] and pinned["onnxruntime"] == pins["onnxruntime"]
    assert all(pinned[k] == pins[k] for k in pinned if k in pins)
    assert not {"torch", "torchvision", "timm"} & set(pinned)


def test_the_bento_serves_from_outside_the_repository_as_the_repository_service_does(built, tiny_package,
                                                                                      bento_home, tmp_path):
    tag, _ = built
    fm, _ = read_fashion("t10k")
    image = tmp_path / "test_0.png"
    Image.fromarray(fm[0]).save(image)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"BENTOML_HOME": str(bento_home), "LTSERVE_THREADS": "1", "LTSERVE_WORKERS": "1"}
    no_model = {k: v for k, v in os.environ.items() if k != "LTSERVE_MODEL"}  # the Bento names its own package
    bento = ServerProcess({**no_model, **env}, tmp_path / "bento.log", target=tag, cwd=outside, inherit_env=False)
    repo = ServerProcess({**env, "LTSERVE_MODEL": str(tiny_package)}, tmp_path / "repo.log", cwd=REPO)
    try:
        answers = []
        for srv in (bento, repo):
            srv.wait_ready()
            with open(image, "rb") as f:
                r = httpx.post(srv.url + "/classify", files={"image": ("test_0.png", f, "image/png")}, timeout=30)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        bento_answer, repo_answer = answers
        assert _without_probabilities(bento_answer) == _without_probabilities(repo_answer)
        assert [e["probability"] for e in bento_answer["top_k"]] == pytest.approx(
            [e["probability"] for e in repo_answer["top_k"]], rel=1e-5)
        served = httpx.get(bento.url + "/model", timeout=10).json()
        assert served["name"] == yaml.safe_load((tiny_package / "model.json").read_text())["name"]
    finally:
        bento.stop()
        repo.stop()


def _without_probabilities(answer: dict) -> dict:
    return {**{k: v for k, v in answer.items() if k != "probability"},
            "top_k": [{k: v for k, v in e.items() if k != "probability"} for e in answer["top_k"]]}


def test_a_tag_already_built_is_kept(built, tiny_package, bento_home, tmp_path):
    tag, _ = built
    again = _ltserve(["bento", str(tiny_package)], tmp_path, {"BENTOML_HOME": str(bento_home)})
    assert again.returncode == 0 and f"already in the store (--force rebuilds it): {tag}" in again.stdout


def test_the_torch_bento_needs_model_pt2_and_says_how_to_get_it(tiny_package, tmp_path):
    with pytest.raises(PackageError, match=r"has no model.pt2.*--model-format onnx,pt2"):
        plan_bento(tiny_package, backend="torch")
    done = _ltserve(["bento", str(tiny_package), "--backend", "torch"], tmp_path,
                    {"BENTOML_HOME": str(tmp_path / "home")})
    assert done.returncode == 2 and "--model-format onnx,pt2" in done.stderr
    assert not (tmp_path / "home" / "bentos").exists()  # refused before anything was built


def test_the_torch_bento_pins_torch_and_sets_the_torch_backend(tmp_path):
    package = build_random_rgb_package(tmp_path / "rgb", pt2=True)
    plan = plan_bento(package, backend="torch")
    assert plan.name == "random-rgb-torch" and plan.envs == {"LTSERVE_MODEL": "models/rgb", **TORCH_ENVS}
    pins = read_constraints()
    assert f"torch=={pins['torch']}" in plan.requirements
    assert f"onnxruntime=={pins['onnxruntime']}" in plan.requirements  # the start-up check's session
    assert not any(r.startswith("torch==") for r in pinned_requirements("onnxruntime"))


def test_the_repository_bentofile_pins_the_tested_versions():
    """bentofile.yaml (`bentoml serve` / `bentoml build` from the repository root): exact pins, from
    constraints.txt, so a Bento never runs a BentoML that ltserve.serve was not tested with."""
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    pins = read_constraints()
    packages = bentofile["python"]["packages"]
    assert not any(p.startswith("torch") for p in packages)  # the default stays torch-free
    assert bentofile["service"] == "ltserve.service:Classifier"
    for p in packages:
        name, _, version = p.partition("==")
        assert version == pins[name.lower()], f"bentofile.yaml: {p}, constraints.txt: {pins.get(name.lower())}"
    assert {"bentoml", "onnxruntime"} <= {p.partition("==")[0] for p in packages}
    assert not (REPO / "bentofile.torch.yaml").exists()  # replaced by `ltserve bento --backend torch`
