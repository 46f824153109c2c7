"""What stage 1 leaves in the run directory: `backbone.safetensors`, `heads/joint.*` and `run.json`."""

from __future__ import annotations

from typing import Any

from ltserve.config import Config
from ltserve.data import Splits
from ltserve.errors import RunError
from ltserve.features.backbones import Classifier
from ltserve.fileio import atomic_write, sha256_file
from ltserve.heads import CalibratedHead, save_head
from ltserve.rundir import BackboneInfo, RunInfo, RunPaths, git_commit, read_run, utc_now, write_run


def export_run(paths: RunPaths, model: Classifier, cfg: Config, splits: Splits, epochs_done: int,
               train_metrics: dict[str, Any], finished: bool, created: str,
               joint: CalibratedHead | None = None) -> RunInfo:
    """Write `backbone.safetensors`, `heads/joint.*` and `run.json` for the current weights.

    Args:
        joint: the joint head to save (stage 1's calibrated head at the end); None takes the model's own layer.
        created: when the run was started (kept across resumes).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    atomic_write(paths.backbone, lambda tmp: save_file(state, str(tmp), metadata={"backbone": cfg.model.backbone}))
    sha = sha256_file(paths.backbone)
    save_head(joint if joint is not None else joint_head(model, cfg, epochs_done, sha, splits.fingerprint),
              paths.heads)
    info = RunInfo(
        config=cfg.model_dump(mode="json"), class_names=list(splits.class_names),
        class_counts=[int(c) for c in splits.class_counts()], many_threshold=cfg.data.many_threshold,
        few_threshold=cfg.data.few_threshold,
        split_sizes={"train": len(splits.train), "val": len(splits.val),
                     "test": len(splits.test) if splits.test is not None else 0},
        data_fingerprint=splits.fingerprint,
        backbone=BackboneInfo(name=cfg.model.backbone, in_chans=cfg.preprocess.channels,
                              num_features=int(model.backbone.num_features), sha256=sha),
        git_commit=git_commit(), created=created, finished=finished, epochs_done=epochs_done,
        train_metrics=train_metrics)
    write_run(paths.root, info)
    return info


def joint_head(model: Classifier, cfg: Config, epochs_done: int, backbone_sha256: str,
               fingerprint: str) -> CalibratedHead:
    """The model's linear layer as the run's joint head (uncalibrated)."""
    return CalibratedHead(
        weight=model.fc.weight.detach().cpu().float().numpy(), bias=model.fc.bias.detach().cpu().float().numpy(),
        method="joint", meta={"stage": 1, "sampler": cfg.train.sampler, "epochs": epochs_done,
                              "backbone_sha256": backbone_sha256, "data_fingerprint": fingerprint})


def created_at(paths: RunPaths) -> str:
    """When the run in `paths` was started: run.json's `created` when resuming one, else now."""
    if paths.run_json.is_file():
        try:
            return read_run(paths.root).created or utc_now()
        except RunError:
            pass
    return utc_now()


def check_out_folder(paths: RunPaths, resume: bool) -> None:
    """Refuse an `--out` that already holds a run unless resuming it.

    Raises:
        RunError: naming the folder and the two ways on.
    """
    if not resume and (paths.run_json.exists() or any(paths.checkpoint.glob("epoch-*.json"))):
        raise RunError(f"{paths.root}: already holds a run; add --resume to continue it, or choose another --out")
