"""Stage-1 checkpoints: safetensors (model, optimizer tensors) + JSON (epoch, step, optimizer hyper-parameters, RNG
states, history). The JSON is written last and names the sha256 of its tensor file, so a crash mid-write leaves the
previous checkpoint valid. No pickle anywhere: RNG states are base64 or lists in the JSON.
"""

from __future__ import annotations

import base64
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from ltserve.config import Config, config_hash
from ltserve.errors import RunError
from ltserve.fileio import atomic_write, sha256_file, write_json
from ltserve.rundir import RunPaths, utc_now
from ltserve.train.loop import Amp, Dist

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Config fields that may differ between the interrupted run and `--resume` (they do not change what is learnt).
RESUME_MAY_DIFFER = ("train.num_workers", "train.eval_batch_size", "train.device", "rebalance")


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw), device)


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors for safetensors, everything else for JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(paths: RunPaths, model: nn.Module, optimizer: torch.optim.Optimizer, amp: Amp,
                    cfg: Config, epoch: int, step: int, history: list[dict], rng: dict[str, Any]) -> Path:
    """Write `checkpoint/epoch-NNNN.safetensors` then its `.json` (the commit point), then drop older checkpoints.

    Args:
        epoch: epochs completed. step: optimisation steps completed.
        rng: RNG states of every rank, {"0": {...}, "1": {...}}.
    """
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer_state(optimizer)
    tensors.update(opt_tensors)
    stem = f"epoch-{epoch:04d}"
    st_path = atomic_write(paths.checkpoint / f"{stem}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    meta = {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"), "tensors": st_path.name, "tensors_sha256": sha256_file(st_path),
        "optimizer": opt_meta, "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
        "rng": rng, "history": history, "saved": utc_now(),
    }
    write_json(paths.checkpoint / f"{stem}.json", meta)
    for old in paths.checkpoint.glob("epoch-*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)
    return st_path


def latest_checkpoint(paths: RunPaths) -> dict[str, Any] | None:
    """The newest checkpoint whose JSON parses and whose tensor file matches its sha256, or None."""
    for meta_path in sorted(paths.checkpoint.glob("epoch-*.json"), reverse=True):
        try:
            meta = json.loads(meta_path.read_text())
            st_path = paths.checkpoint / meta["tensors"]
            if st_path.is_file() and sha256_file(st_path) == meta["tensors_sha256"]:
                meta["_tensors_path"] = str(st_path)
                return meta
            log.warning("%s: tensor file missing or changed; trying an older checkpoint", meta_path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable checkpoint (%s); trying an older one", meta_path, exc)
    return None


def check_resume_config(meta: dict[str, Any], cfg: Config, paths: RunPaths) -> None:
    old = _flatten(meta["config"])
    new = _flatten(cfg.model_dump(mode="json"))
    diff = [k for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_DIFFER)]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise RunError(f"{paths.checkpoint}: cannot resume with a different recipe ({shown}); resume with the "
                       f"recipe in {paths.run_json} or train into a new --out folder")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def restore_checkpoint(meta: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, amp: Amp,
             dist: Dist, device: torch.device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(meta["_tensors_path"])
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{meta['_tensors_path']}: does not fit the model of this recipe: {exc}") from None
    optimizer.load_state_dict(_join_optimizer_state(tensors, meta["optimizer"]))
    if amp.scaler is not None and meta.get("scaler"):
        amp.scaler.load_state_dict(meta["scaler"])
    rng = meta["rng"].get(str(dist.rank))
    if rng is None:  # resumed with more processes than before: derive this rank's state instead
        log.warning("checkpoint has no RNG state for rank %d; seeding it from train.seed", dist.rank)
        seed_everything(int(meta["config"]["train"]["seed"]) + 1000 * dist.rank + int(meta["epoch"]))
    else:
        _set_rng_state(rng, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rng(dist: Dist, device: torch.device) -> dict[str, Any]:
    mine = _rng_state(device)
    if not dist.enabled:
        return {"0": mine}
    everyone: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, mine)
    return {str(r): s for r, s in enumerate(everyone)}

