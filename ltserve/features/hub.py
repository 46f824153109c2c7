"""`model.pretrained` by name: a local file, a Hugging Face hub repo, or a timm pretrained tag.

    /weights/resnet50.safetensors   a local file (.safetensors, or a .pth state dict read with weights_only=True)
    hf-hub:timm/resnet18.a1_in1k    a hub repo (optionally @revision): its model.safetensors
    resnet18.a1_in1k                a timm pretrained tag: the hub repo timm names for it (timm/resnet18.a1_in1k)

Hub weights are downloaded once into huggingface_hub's cache (HF_HOME, HF_HUB_CACHE; HF_ENDPOINT and HF_HUB_OFFLINE
apply as for any huggingface_hub download) and read from there afterwards, offline too. Only safetensors files are
fetched from a hub: a repo that has only pickled weights (.bin, .pth) is refused, never unpickled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ltserve.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
SAFE_WEIGHTS = "model.safetensors"
"""The file a hub repo's weights are read from (timm and transformers publish safetensors under this name)."""
LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
LOCAL_FILE_HINT = "model.pretrained: /path/to/weights.safetensors"
HUB_NAME_FORMS = ("a hub name (hf-hub:ORG/NAME[@REVISION], or a timm pretrained tag such as resnet18.a1_in1k; "
                  "list them with python -c \"import timm; print(timm.list_pretrained('resnet18*'))\")")


@dataclass(frozen=True)
class HubWeights:
    """Where a hub name's weights live.

    Attributes:
        name: the `model.pretrained` value, for messages.
        repo_id: ORG/NAME on the hub.
        revision: branch, tag or commit; None for the default branch.
        filename: the safetensors file in the repo.
    """

    name: str
    repo_id: str
    revision: str | None
    filename: str = SAFE_WEIGHTS


def hub_weights(value: str) -> HubWeights | None:
    """The hub repo that a `model.pretrained` value names, or None when it names a local file.

    An existing file, or a value with a weights suffix or a path separator, is a local file; `hf-hub:ORG/NAME` is a
    hub repo; any other value must be a timm pretrained tag.

    Raises:
        ConfigError: a malformed hf-hub name, an unknown name (neither a file nor a timm tag), or a timm tag whose
            weights are not on the hub (only as a pickled .pth file).
    """
    if value.startswith(HF_HUB_PREFIX):
        repo_id, _, revision = value[len(HF_HUB_PREFIX):].partition("@")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"model.pretrained: {value!r} is not a hub name; write hf-hub:ORG/NAME[@REVISION], "
                              "e.g. hf-hub:timm/resnet18.a1_in1k")
        return HubWeights(value, repo_id, revision or None)
    path = Path(value)
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or "/" in value or "\\" in value:
        return None
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(value)
    except RuntimeError:  # a known architecture with an unknown tag
        arch = value.split(".", 1)[0]
        raise ConfigError(f"model.pretrained: {value!r} is not a timm pretrained tag; {arch}'s are "
                          f"{', '.join(timm.list_pretrained(arch + '.*')) or 'none'}") from None
    if cfg is None:
        raise ConfigError(f"model.pretrained: {value}: no such file, and not {HUB_NAME_FORMS}")
    if not cfg.hf_hub_id:
        raise ConfigError(f"model.pretrained: timm's {value} weights are not on the hub, only at {cfg.url or cfg.file} "
                          f"(a pickled .pth, which ltserve does not unpickle); convert them to safetensors and give "
                          f"the file: {LOCAL_FILE_HINT}")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    return HubWeights(value, repo_id, revision or None, _safe_filename(cfg.hf_hub_filename))


def _safe_filename(filename: str | None) -> str:
    """The safetensors file the hub publishes beside a pickled one: pytorch_model.bin -> model.safetensors."""
    if filename is None or filename == "pytorch_model.bin":
        return SAFE_WEIGHTS
    if filename.endswith(".safetensors"):
        return filename
    return Path(filename.replace("_pytorch_model", "_model")).with_suffix(".safetensors").name


def download_weights(hub: HubWeights) -> Path:
    """The local path of a hub name's safetensors file: downloaded into huggingface_hub's cache once, then reused.

    Raises:
        ConfigError: the hub cannot be reached (or offline mode is on) and the file is not cached; the repo,
            revision or safetensors file does not exist; any other download error. Each names the hub name and the
            local-file alternative.
        MissingDependency: huggingface_hub is not installed.
    """
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise MissingDependency(f"model.pretrained: {hub.name} needs huggingface_hub to download weights; install "
                                f"the training extra (pip install -e '.[train]') or give a local file: "
                                f"{LOCAL_FILE_HINT}") from None
    where = f"{hub.repo_id}/{hub.filename}" + (f"@{hub.revision}" if hub.revision else "")
    instead = f"or download the weights elsewhere and give the local file: {LOCAL_FILE_HINT}"
    log.info("model.pretrained %s: %s from the hub (or huggingface_hub's cache)", hub.name, where)
    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision))
    # LocalEntryNotFoundError is an EntryNotFoundError too: it must be caught first
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        how = ("offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
               else f"no answer from {constants.ENDPOINT}")
        raise ConfigError(f"model.pretrained: {hub.name}: the Hugging Face hub could not be reached ({how}) and "
                          f"{where} is not in the local cache ({constants.HF_HUB_CACHE}); connect once (unset "
                          f"HF_HUB_OFFLINE) to download it, {instead}") from None
    except EntryNotFoundError:
        raise ConfigError(f"model.pretrained: {hub.name}: {hub.repo_id} has no {hub.filename}; ltserve reads hub "
                          "weights from safetensors only and will never unpickle a .bin or .pth file (unpickling can "
                          "run code); convert them (safetensors.torch.save_file(state_dict, 'weights.safetensors')) "
                          f"and give the file: {LOCAL_FILE_HINT}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ConfigError(f"model.pretrained: {hub.name}: no hub repo {hub.repo_id} (or it is private or gated: log "
                          f"in with `hf auth login` and accept its terms); fix the name, {instead}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"model.pretrained: {hub.name}: {hub.repo_id} has no revision {hub.revision!r}; fix it, "
                          f"{instead}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"model.pretrained: {hub.name}: downloading {where} failed ({exc}); retry, "
                          f"{instead}") from None
