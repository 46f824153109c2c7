"""`rebalance(run)`: which heads (`resolve_heads`), this invocation's overrides (`apply_rebalance_overrides`), and
the stage run over them (`ltserve.rebalance.stage.Stage2`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ltserve.config import Config, apply_override, config_from_dict
from ltserve.errors import ConfigError, RunError, unknown_choice
from ltserve.heads import HEADS, CalibratedHead
from ltserve.rebalance.stage import Stage2
from ltserve.rundir import Run, open_run

log = logging.getLogger(__name__)


def resolve_heads(heads: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Head names from a comma list, a sequence, "all" or None (the config's list), in registry order.

    Raises:
        ConfigError: an unknown name (the closest valid one is suggested).
    """
    stage2 = HEADS.stage2()
    if heads is None:
        names = list(default)
    elif isinstance(heads, str):
        names = [h.strip() for h in heads.split(",") if h.strip()]
    else:
        names = list(heads)
    if names == ["all"]:
        names = list(stage2)
    for name in names:
        if name not in stage2:
            raise ConfigError(unknown_choice("--heads", name, [*stage2, "all"]))
    if not names:
        raise ConfigError(f"--heads: no head given; choose from {', '.join(stage2)} or all")
    return [h for h in stage2 if h in names]


def apply_rebalance_overrides(cfg: Config, overrides: Sequence[str], source: str = "--set") -> Config:
    """`rebalance.x=y` overrides (or `x=y`, taken as rebalance.x) applied to the run's config for one invocation.

    Raises:
        ConfigError: an override outside the rebalance section (the backbone is fixed at stage 2) or an invalid value.
    """
    raw = cfg.model_dump(mode="json")
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        top = key.split(".", 1)[0]
        if top != "rebalance":
            if top in Config.model_fields:
                raise ConfigError(f"--set {assignment!r}: stage 2 only changes the rebalance section (the run's "
                                  f"{top} section is fixed by stage 1); e.g. --set rebalance.crt.epochs=5")
            assignment = f"rebalance.{assignment.strip()}"
        apply_override(raw, assignment)
    return config_from_dict(raw, source)


def rebalance(run: Run | str | Path, heads: str | Sequence[str] | None = None, cfg: Config | None = None, *,
              overrides: Sequence[str] = (), use_cache: bool | None = None, tau: float | None = None,
              target_prior: str | None = None, device: str | None = None,
              progress: bool = True) -> dict[str, CalibratedHead]:
    """Fit stage-2 heads on a finished run and write them to `heads/`.

    Args:
        run: a run made by `ltserve train` (a `Run`, or its directory).
        heads: head names (comma list or sequence), "all", or None for `cfg.rebalance.heads`.
        cfg: the config to use; None takes the run's resolved config (run.json).
        overrides: `rebalance.x=y` strings applied for this invocation.
        use_cache: False feeds the methods that train (crt, lws) augmented images through the frozen backbone every
            epoch; None takes `rebalance.use_cache`.
        tau: a fixed tau for tau_norm (overrides `rebalance.tau_norm.tau`).
        target_prior: "uniform", "train" or a file of C class weights (overrides `rebalance.target_prior`).
        device: "auto", "cpu" or "cuda"; None takes `train.device`.
        progress: show progress bars (on a terminal).

    Returns:
        {head name: saved CalibratedHead} for every head written (a missing base of tau_norm+la / lws+la is fitted
        and written too).

    Raises:
        RunError: the run, its joint head or its features are missing or inconsistent.
        ConfigError: an unknown head or an invalid override.
    """
    run = open_run(run)
    if not run.info.finished:
        raise RunError(f"{run.paths.run_json}: stage 1 has not finished; resume it with "
                       f"`ltserve train ... --out {run.root} --resume` first")
    cfg = cfg if cfg is not None else run.config
    extra = list(overrides)
    if tau is not None:
        extra.append(f"rebalance.tau_norm.tau={tau}")
    if target_prior is not None:
        extra.append(f"rebalance.target_prior={target_prior}")
    if use_cache is not None:
        extra.append(f"rebalance.use_cache={str(bool(use_cache)).lower()}")
    if extra:
        cfg = apply_rebalance_overrides(cfg, extra)
    names = resolve_heads(heads, cfg.rebalance.heads)
    state = Stage2(run, cfg, device=device or cfg.train.device, progress=progress)
    for name in names:
        if name not in state.saved:
            state.fit(name)
            log.info("wrote %s/%s.safetensors", run.paths.heads, name)
    run.forget_heads()
    return dict(state.saved)
