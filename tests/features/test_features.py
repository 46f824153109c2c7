"""Frozen-backbone features and the run's feature cache, on the tiny Fashion-MNIST-LT run."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from ltserve.errors import RunError
from ltserve.features.cache import cached_features
from ltserve.features.extract import extract_features
from ltserve.rundir import RunPaths, read_run


def test_cache_is_built_once_then_reused(tiny_run, copy_run, caplog):
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    info = read_run(run)
    shutil.rmtree(paths.cache)  # stage 1 left every split's features here; build them again from the backbone
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        feats, labels = cached_features(run, "train")
    assert "building (no cache yet)" in caplog.text
    assert feats.shape == (info.split_sizes["train"], info.backbone.num_features) and feats.dtype == np.float32
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == info.class_counts
    meta = json.loads((paths.cache / "train.json").read_text())
    assert meta["dtype"] == "float16" and meta["shape"] == list(feats.shape)
    assert meta["backbone_sha256"] == info.backbone.sha256 and meta["data_fingerprint"] == info.data_fingerprint
    assert meta["preprocess"]["crop"] == 28

    stamp = (paths.cache / "train.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        again, labels2 = cached_features(run, "train")
    assert "building" not in caplog.text
    assert (paths.cache / "train.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    np.testing.assert_array_equal(again, feats)
    np.testing.assert_array_equal(labels2, labels)


def test_float16_cache_is_close_to_fresh_float32(tiny_run):
    cached, labels = cached_features(tiny_run, "val")
    fresh, fresh_labels = cached_features(tiny_run, "val", use_cache=False)
    np.testing.assert_array_equal(labels, fresh_labels)
    assert not np.array_equal(cached, fresh)  # the cache really holds float16
    np.testing.assert_allclose(cached, fresh, rtol=2e-3, atol=1e-3 * float(np.abs(fresh).max()))
    np.testing.assert_array_equal(cached, cached.astype(np.float16).astype(np.float32))  # float16 values
    # the float16 rounding of the fresh features, to one float16 step: stage 1 wrote the cache from the model still
    # in memory, a float32 pass of its own whose last bit may differ from this one's (a value near the middle of two
    # float16 numbers then rounds to the other), so bit-for-bit equality would test the kernels, not the cache
    step = np.spacing(np.abs(fresh).astype(np.float16)).astype(np.float32)
    assert (np.abs(cached - fresh) <= step).all()


def test_cache_rebuilt_when_the_backbone_changes(tiny_run, copy_run, caplog):
    from safetensors.numpy import load_file, save_file

    run = copy_run(tiny_run)
    paths = RunPaths(run)
    before, _ = cached_features(run, "val")
    state = load_file(str(paths.backbone))
    key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[key] = state[key] * np.float32(0.5)
    save_file(state, str(paths.backbone))
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        after, _ = cached_features(run, "val")
    assert "the backbone changed" in caplog.text
    assert not np.allclose(before, after)
    from ltserve.fileio import sha256_file

    assert json.loads((paths.cache / "val.json").read_text())["backbone_sha256"] == sha256_file(paths.backbone)


def test_cache_rebuilt_when_the_recorded_data_differs(tiny_run, copy_run, caplog):
    run = copy_run(tiny_run)
    meta_path = RunPaths(run).cache / "val.json"
    cached_features(run, "val")
    meta = json.loads(meta_path.read_text())
    meta["data_fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="ltserve.features.cache"):
        cached_features(run, "val")
    assert "the data changed" in caplog.text
    assert json.loads(meta_path.read_text())["data_fingerprint"] == read_run(run).data_fingerprint


def test_data_on_disk_that_is_not_the_runs_data_is_an_error(tiny_run, copy_run):
    run = copy_run(tiny_run)
    paths = RunPaths(run)
    raw = json.loads(paths.run_json.read_text())
    raw["data_fingerprint"] = "f" * 16
    paths.run_json.write_text(json.dumps(raw))
    with pytest.raises(RunError, match="not the one this run was trained on"):
        cached_features(run, "test")


def test_unknown_split_is_an_error(tiny_run):
    with pytest.raises(RunError, match="not one of train, val, test"):
        cached_features(tiny_run, "holdout", use_cache=False)  # type: ignore[arg-type]


def test_array_fast_path_matches_the_pillow_transform(tiny_run):
    """In-memory 28 px arrays skip Pillow; features equal the transform_image + to_model_input path exactly."""
    from ltserve.features.backbones import load_run_backbone
    from ltserve.features.cache import splits_for
    from ltserve.preprocess import transform_image
    from ltserve.rundir import open_run

    backbone, cfg = load_run_backbone(tiny_run), open_run(tiny_run).config
    images = splits_for(cfg.data).val
    fast = extract_features(backbone, images, cfg.preprocess, batch_size=32)
    slow = extract_features(backbone, images, cfg.preprocess, batch_size=32,
                            transform=lambda img: transform_image(img, cfg.preprocess))
    np.testing.assert_array_equal(fast, slow)
    assert backbone.training is False


def test_train_transform_gives_augmented_features(tiny_run):
    """Stage 2's --no-cache path: the training augmentation through extract_features."""
    from ltserve.data import build_train_transform
    from ltserve.features.backbones import load_run_backbone
    from ltserve.features.cache import splits_for
    from ltserve.rundir import open_run

    backbone, cfg = load_run_backbone(tiny_run), open_run(tiny_run).config
    images = splits_for(cfg.data).val
    plain = extract_features(backbone, images, cfg.preprocess)
    augmented = extract_features(backbone, images, cfg.preprocess, transform=build_train_transform(cfg))
    assert augmented.shape == plain.shape and not np.allclose(augmented, plain)


# --- pretrained weights: a local file, or a hub name downloaded into huggingface_hub's cache ------------------------


def _random_state(backbone: str, in_chans: int) -> dict:
    """A state dict of `backbone` with seeded random values (no init gives them), plus a classifier it lacks."""
    import torch

    from ltserve.features.backbones import create_backbone

    gen = torch.Generator().manual_seed(7)
    state = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).contiguous()
             for k, v in create_backbone(backbone, in_chans=in_chans).state_dict().items()}
    state["fc.weight"] = torch.randn(10, 4, generator=gen)  # timm checkpoints carry their classifier
    return state


def test_pretrained_local_safetensors_loads_and_reports_unexpected_keys(tmp_path, caplog):
    import torch
    from safetensors.torch import save_file

    from ltserve.errors import ConfigError
    from ltserve.features.backbones import create_backbone

    state = _random_state("resnet8_cifar", 1)
    save_file(state, str(tmp_path / "w.safetensors"))
    with caplog.at_level(logging.WARNING, logger="ltserve.features.backbones"):
        model = create_backbone("resnet8_cifar", in_chans=1, pretrained=tmp_path / "w.safetensors")
    assert "1 unexpected keys (ignored): fc.weight" in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ConfigError, match="shape mismatch for stem.0.weight"):
        create_backbone("resnet8_cifar", in_chans=3, pretrained=tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=r"nope: no such file, and not a hub name .*hf-hub:"):
        create_backbone("resnet8_cifar", in_chans=1, pretrained="nope")


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The hub's resolve endpoint, as huggingface_hub calls it: HEAD then GET /{org}/{name}/resolve/{rev}/{file},
    answered with X-Repo-Commit, ETag and Content-Length; a missing file is a 404 with X-Error-Code."""

    files: dict[str, bytes] = {}  # "org/name/file" -> bytes
    requests: list[str] = []

    def _answer(self, send_body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", self.path.split("?")[0])
        data = self.files.get(f"{match[1]}/{match[2]}") if match else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", HUB_COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def do_GET(self):  # noqa: N802
        self._answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture()
def hub():
    """A local stand-in for the Hugging Face hub on 127.0.0.1: (url, files, requests)."""
    _HubHandler.files, _HubHandler.requests = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _HubHandler.files, _HubHandler.requests
    httpd.shutdown()
    httpd.server_close()


LOAD_PRETRAINED = """
import json, sys
from ltserve.errors import LtserveError
from ltserve.features.backbones import create_backbone
out = []
for arg in sys.argv[1:]:
    backbone, in_chans, name = arg.split(",")
    try:
        state = create_backbone(backbone, in_chans=int(in_chans), pretrained=name).state_dict()
        out.append({k: float(v.double().sum()) for k, v in state.items()})
    except LtserveError as exc:
        out.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def _load_pretrained(hf_home, *loads: str, **env: str) -> list:
    """create_backbone(backbone, in_chans, pretrained=name) for each "backbone,in_chans,name", in a fresh interpreter
    (huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    out = subprocess.run([sys.executable, "-c", LOAD_PRETRAINED, *loads], capture_output=True, text=True, timeout=300,
                         env={**clean, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sums(state: dict) -> dict:
    return {k: float(v.double().sum()) for k, v in state.items() if k != "fc.weight"}


def test_pretrained_from_the_hub_is_downloaded_once_then_read_from_the_cache(hub, tmp_path):
    from safetensors.torch import save

    url, files, requests = hub
    cifar, timm_test = _random_state("resnet8_cifar", 1), _random_state("test_resnet", 3)
    files["ltserve-test/resnet8/model.safetensors"] = save(cifar)
    files["timm/test_resnet.r160_in1k/model.safetensors"] = save(timm_test)  # where timm's tag points
    files["ltserve-test/pickled/pytorch_model.bin"] = b"a pickle: never downloaded, never unpickled"
    loads = ["resnet8_cifar,1,hf-hub:ltserve-test/resnet8", "test_resnet,3,test_resnet.r160_in1k",
             "resnet8_cifar,1,hf-hub:ltserve-test/pickled"]
    first = _load_pretrained(tmp_path / "hf", *loads, HF_ENDPOINT=url)
    assert first[0] == _sums(cifar) and first[1] == _sums(timm_test)
    assert "hf-hub:ltserve-test/pickled" in first[2] and "ConfigError" in first[2]
    assert "model.safetensors" in first[2] and "never unpickle" in first[2]
    assert "model.pretrained: /path/to/weights.safetensors" in first[2]
    gets = [r for r in requests if r.startswith("GET")]
    assert sorted(gets) == ["GET /ltserve-test/resnet8/resolve/main/model.safetensors",
                            "GET /timm/test_resnet.r160_in1k/resolve/main/model.safetensors"]
    assert not any("pytorch_model.bin" in r for r in requests)
    assert (tmp_path / "hf" / "hub" / "models--ltserve-test--resnet8").is_dir()  # huggingface_hub's own cache

    requests.clear()
    offline = _load_pretrained(tmp_path / "hf", *loads[:2], "resnet18,3,resnet18.a1_in1k", HF_ENDPOINT=url,
                               HF_HUB_OFFLINE="1")
    assert offline[:2] == first[:2] and requests == []  # from the cache: the hub was not asked
    # offline, and not in the cache: a clear error naming the tag, the repo timm names for it and the way out
    msg = offline[2]
    assert msg.startswith("ConfigError: model.pretrained: resnet18.a1_in1k") and "timm/resnet18.a1_in1k" in msg
    assert "could not be reached" in msg and "HF_HUB_OFFLINE" in msg
    assert "model.pretrained: /path/to/weights.safetensors" in msg


def test_pretrained_from_an_unreachable_hub_is_a_clear_config_error(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there any more
    # huggingface_hub retries a first download for ~20 s before it gives up: one name only
    [msg] = _load_pretrained(tmp_path / "empty", "resnet8_cifar,1,hf-hub:ltserve-test/resnet8", HF_ENDPOINT=closed)
    assert msg.startswith("ConfigError: model.pretrained: hf-hub:ltserve-test/resnet8"), msg
    assert f"could not be reached (no answer from {closed})" in msg
    assert "model.pretrained: /path/to/weights.safetensors" in msg
    assert not (tmp_path / "empty" / "hub" / "models--ltserve-test--resnet8" / "snapshots").exists()
