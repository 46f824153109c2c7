"""Stage 2: re-balance the classifier on the frozen backbone's features (Kang et al., ICLR 2020).

`ltserve rebalance runs/NAME` fits every requested head on the run's cached features and writes
`heads/<head>.safetensors` + `heads/<head>.json`; it never changes `run.json`, `backbone.safetensors` or
`heads/joint.*`. One file per method, each a small class (settings in `__init__`, `fit(train_features,
train_labels, base_head, val=(features, labels)) -> CalibratedHead`):

    crt          `crt.CRT`               re-initialised linear layer, class-balanced sampling, best epoch on val
    lws          `lws.LWS`               per-class scales f_j on the joint W and b, best epoch on val
    tau_norm     `tau_norm.TauNorm`      W_j / ||W_j||^tau, tau swept on val
    ncm          `ncm.NCM`               nearest class mean on centred, L2-normalised features
    la           `la.LogitAdjustment`    joint bias - tau_la log pi, tau_la swept on val
    tau_norm+la, lws+la                  the same adjustment on the fitted tau_norm / lws head

Every head then gets the target prior (`prior.py`: uniform, train or a file of class weights) added to its bias and
a temperature fitted on val (`calibrate.py`).

Batch norm: the official cRT and LWS runs leave BN in train mode during stage 2, so their BN statistics drift and
each of their heads ends up with its own backbone. ltserve keeps the stage-1 backbone exactly (eval mode, BN frozen)
for every head, which is what lets stage 2 run on cached features and one exported backbone serve every head.
`--no-cache` still sends augmented images through that same frozen backbone every epoch (crt and lws only), the
official way of feeding stage 2, so the two can be compared (`benchmarks/stage2.py`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltserve.config import STAGE2_HEADS, Config, RebalanceConfig, apply_override, config_from_dict, unknown_choice
from ltserve.errors import ConfigError, RunError
from ltserve.heads import CalibratedHead, load_head, save_head
from ltserve.metrics import classification_report
from ltserve.rebalance.calibrate import calibrate
from ltserve.rebalance.prior import apply_target_prior, strip_target_prior, target_log_prior
from ltserve.rundir import RunInfo, RunPaths, read_run, utc_now

log = logging.getLogger(__name__)

BASE_OF = {"la": "joint", "tau_norm+la": "tau_norm", "lws+la": "lws"}
"""The head each logit-adjusted head is built on (its parameters fixed)."""

TRAINED_HEADS = ("crt", "lws")
"""Heads that train on batches, and so can be fed augmented images (`--no-cache`)."""


def resolve_heads(heads: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Head names from a comma list, a sequence, "all" or None (the config's list), in canonical order.

    Raises:
        ConfigError: an unknown name (the closest valid one is suggested).
    """
    if heads is None:
        names = list(default)
    elif isinstance(heads, str):
        names = [h.strip() for h in heads.split(",") if h.strip()]
    else:
        names = list(heads)
    if names == ["all"]:
        names = list(STAGE2_HEADS)
    for name in names:
        if name not in STAGE2_HEADS:
            raise ConfigError(unknown_choice("--heads", name, list(STAGE2_HEADS) + ["all"]))
    if not names:
        raise ConfigError(f"--heads: no head given; choose from {', '.join(STAGE2_HEADS)} or all")
    return [h for h in STAGE2_HEADS if h in names]


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


def build_method(name: str, rcfg: RebalanceConfig, *, many_threshold: int = 100, few_threshold: int = 20,
                 device: str = "auto", progress: bool = True) -> Any:
    """The method object for head `name`, its settings taken from `rcfg` (the rebalance section)."""
    from ltserve.rebalance.crt import CRT
    from ltserve.rebalance.la import LogitAdjustment
    from ltserve.rebalance.lws import LWS
    from ltserve.rebalance.ncm import NCM
    from ltserve.rebalance.tau_norm import TauNorm

    groups = {"many_threshold": many_threshold, "few_threshold": few_threshold}
    if name in ("crt", "lws"):
        section = rcfg.crt if name == "crt" else rcfg.lws
        cls = CRT if name == "crt" else LWS
        return cls(**section.model_dump(), seed=rcfg.seed, device=device, progress=progress, **groups)
    if name == "tau_norm":
        t = rcfg.tau_norm
        return TauNorm(tau=t.tau, tau_grid=t.tau_grid, keep_bias=t.keep_bias, **groups)
    if name == "ncm":
        return NCM(metric=rcfg.ncm.metric)
    if name in BASE_OF:
        return LogitAdjustment(tau_la=rcfg.la.tau_la, tau_grid=rcfg.la.tau_grid, **groups)
    raise ConfigError(unknown_choice("head", name, list(STAGE2_HEADS)))


class _Stage2:
    """One invocation's state: the run, its features and the raw (pre-prior, pre-temperature) heads fitted so far."""

    def __init__(self, run_dir: Path, info: RunInfo, cfg: Config, *, use_cache: bool, device: str, progress: bool):
        from ltserve.features import cached_features

        self.paths = RunPaths(run_dir)
        self.info, self.cfg, self.rcfg = info, cfg, cfg.rebalance
        self.use_cache, self.device, self.progress = use_cache, device, progress
        self.joint = load_head(self.paths.heads, "joint")
        self.train_x, self.train_y = cached_features(run_dir, "train")
        self.val_x, self.val_y = cached_features(run_dir, "val")
        self.counts = np.asarray(info.class_counts, dtype=np.int64)
        self._check_features()
        # read a prior file before any fitting, so a bad file fails fast
        self.prior = target_log_prior(self.rcfg.la.target_prior, self.counts, info.class_names)
        self.raw: dict[str, CalibratedHead] = {"joint": self.joint}
        self.saved: dict[str, CalibratedHead] = {}
        self._augmented: Any = None

    def _check_features(self) -> None:
        c = self.joint.num_classes
        if len(self.counts) != c:
            raise RunError(f"{self.paths.run_json}: {len(self.counts)} class counts but heads/joint has {c} classes")
        train_counts = np.bincount(self.train_y, minlength=c)
        if not np.array_equal(train_counts, self.counts):
            raise RunError(f"{self.paths.cache}: cached train labels do not match run.json's class_counts; the cache "
                           "is stale: delete the cache/ folder and run again")
        if len(self.val_y) == 0:
            raise RunError(f"{self.paths.root}: the run has no val split; stage 2 picks epochs and tau on val "
                           "(train with data.val_fraction > 0 or data.longtail.val_per_class > 0)")

    def method(self, name: str) -> Any:
        return build_method(name, self.rcfg, many_threshold=self.info.many_threshold,
                            few_threshold=self.info.few_threshold, device=self.device, progress=self.progress)

    def train_features(self, name: str) -> Any:
        """Cached features, or (with use_cache False, crt and lws) augmented images through the frozen backbone."""
        if self.use_cache or name not in TRAINED_HEADS:
            return self.train_x
        if self._augmented is None:
            from ltserve.rebalance._augmented import AugmentedSource

            self._augmented = AugmentedSource.from_run(self.paths.root, self.cfg, device=self.device)
        return self._augmented

    def base(self, name: str) -> CalibratedHead:
        """The raw head `name` builds on: fitted in this invocation, else read from heads/, else fitted now."""
        base = BASE_OF[name]
        if base in self.raw:
            return self.raw[base]
        if (self.paths.heads / f"{base}.safetensors").is_file():
            log.info("%s: building on the saved %s head", name, base)
            return strip_target_prior(load_head(self.paths.heads, base))
        log.info("%s: fitting its base head %s first (it is saved too)", name, base)
        self.fit(base)
        return self.raw[base]

    def fit(self, name: str) -> CalibratedHead:
        """Fit head `name`, add the target prior, calibrate, record val metrics, save it; returns the saved head."""
        base = self.base(name) if name in BASE_OF else self.joint
        start = time.perf_counter()
        raw = self.method(name).fit(self.train_features(name), self.train_y, base, val=(self.val_x, self.val_y))
        self.raw[name] = raw
        head = self.finish(raw)
        head = _with_meta(head, fit_seconds=time.perf_counter() - start, **self.provenance(name))
        save_head(head, self.paths.heads)
        self.saved[name] = head
        return head

    def finish(self, raw: CalibratedHead) -> CalibratedHead:
        """Target prior, temperature and val metrics on a raw head."""
        head = apply_target_prior(raw, *self.prior)
        if self.rcfg.calibrate:
            head = calibrate(head, self.val_x, self.val_y)
        return _with_meta(head, val=self.val_report(head))

    def val_report(self, head: CalibratedHead) -> dict[str, Any]:
        return classification_report(head.logits(self.val_x), self.val_y, self.counts, self.info.many_threshold,
                                     self.info.few_threshold)

    def provenance(self, name: str) -> dict[str, Any]:
        section = {"crt": "crt", "lws": "lws", "tau_norm": "tau_norm", "ncm": "ncm"}.get(name, "la")
        return {
            "settings": getattr(self.rcfg, section).model_dump(mode="json"),
            "seed": self.rcfg.seed,
            "calibrate": self.rcfg.calibrate,
            "train_features": "augmented" if (not self.use_cache and name in TRAINED_HEADS) else "cached",
            "backbone_sha256": self.info.backbone.sha256,
            "data_fingerprint": self.info.data_fingerprint,
            "created": utc_now(),
        }


def _with_meta(head: CalibratedHead, **meta: Any) -> CalibratedHead:
    from dataclasses import replace

    return replace(head, meta={**head.meta, **meta})


def rebalance(run_dir: str | Path, heads: str | Sequence[str] | None = None, cfg: Config | None = None, *,
              overrides: Sequence[str] = (), use_cache: bool | None = None, tau: float | None = None,
              target_prior: str | None = None, device: str | None = None,
              progress: bool = True) -> dict[str, CalibratedHead]:
    """Fit stage-2 heads on a finished run and write them to `run_dir/heads/`.

    Args:
        run_dir: a run directory made by `ltserve train`.
        heads: head names (comma list or sequence), "all", or None for `cfg.rebalance.heads`.
        cfg: the config to use; None reads the run's resolved config from run.json.
        overrides: `rebalance.x=y` strings applied for this invocation.
        use_cache: False feeds crt and lws augmented images through the frozen backbone every epoch; None takes
            `rebalance.use_cache`.
        tau: a fixed tau for tau_norm (overrides `rebalance.tau_norm.tau`).
        target_prior: "uniform", "train" or a file of C class weights (overrides `rebalance.la.target_prior`).
        device: "auto", "cpu" or "cuda"; None takes `train.device`.
        progress: show progress bars.

    Returns:
        {head name: saved CalibratedHead} for every head written (a missing base of tau_norm+la / lws+la is fitted
        and written too).

    Raises:
        RunError: the run, its joint head or its features are missing or inconsistent.
        ConfigError: an unknown head or an invalid override.
    """
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    if not info.finished:
        raise RunError(f"{RunPaths(run_dir).run_json}: stage 1 has not finished; resume it with "
                       f"`ltserve train ... --out {run_dir} --resume` first")
    cfg = cfg if cfg is not None else config_from_dict(info.config, str(RunPaths(run_dir).run_json))
    extra = list(overrides)
    if tau is not None:
        extra.append(f"rebalance.tau_norm.tau={tau}")
    if target_prior is not None:
        extra.append(f"rebalance.la.target_prior={target_prior}")
    if use_cache is not None:
        extra.append(f"rebalance.use_cache={str(bool(use_cache)).lower()}")
    if extra:
        cfg = apply_rebalance_overrides(cfg, extra)
    names = resolve_heads(heads, cfg.rebalance.heads)
    state = _Stage2(run_dir, info, cfg, use_cache=cfg.rebalance.use_cache, device=device or cfg.train.device,
                    progress=progress)
    for name in names:
        if name not in state.saved:
            state.fit(name)
            log.info("wrote %s/%s.safetensors", state.paths.heads, name)
    return dict(state.saved)


def val_summary(run_dir: str | Path, heads: dict[str, CalibratedHead]) -> dict[str, dict[str, Any]]:
    """{head: val report} for the joint head (computed now) and every given head (from its meta)."""
    from ltserve.features import cached_features

    info = read_run(run_dir)
    vx, vy = cached_features(run_dir, "val")
    joint = load_head(RunPaths(run_dir).heads, "joint")
    out = {"joint": classification_report(joint.logits(vx), vy, info.class_counts, info.many_threshold,
                                          info.few_threshold)}
    for name, head in heads.items():
        out[name] = {**head.meta.get("val", {}), "chosen": chosen_value(head), "temperature": head.temperature}
    return out


def chosen_value(head: CalibratedHead) -> str:
    """What val chose for a head, in words: "tau=0.7", "epoch 8/10", "tau=0.7, tau_la=0.4", "" for ncm."""
    m = head.meta
    parts = []
    if "base_meta" in m and "tau" in m["base_meta"]:
        parts.append(f"tau={m['base_meta']['tau']:g}")
    if "base_meta" in m and "best_epoch" in m["base_meta"]:
        parts.append(f"epoch {m['base_meta']['best_epoch']}/{m['base_meta']['epochs']}")
    if "tau" in m:
        parts.append(f"tau={m['tau']:g}")
    if "best_epoch" in m:
        parts.append(f"epoch {m['best_epoch']}/{m['epochs']}")
    if "tau_la" in m:
        parts.append(f"tau_la={m['tau_la']:g}")
    return ", ".join(parts)


def cli(argv: list[str] | None = None) -> int:
    """`ltserve rebalance runs/NAME [--heads ...] [--no-cache] [--tau T] [--target-prior P] [--set k=v]`."""
    parser = argparse.ArgumentParser(
        prog="ltserve rebalance",
        description="Stage 2: re-balance the classifier of a trained run on its cached features. Writes "
                    "heads/<head>.safetensors + .json; run.json, the backbone and the joint head are not changed.")
    parser.add_argument("run_dir", type=Path, help="the run directory (made by `ltserve train`)")
    parser.add_argument("--heads", default=None,
                        help=f"comma list of {','.join(STAGE2_HEADS)}, or all (default: rebalance.heads of the run)")
    parser.add_argument("--no-cache", action="store_true",
                        help="crt/lws: send augmented images through the frozen backbone every epoch instead of "
                             "training on cached features (slower; the official code's way)")
    parser.add_argument("--tau", type=float, default=None, help="fixed tau for tau_norm (default: swept on val)")
    parser.add_argument("--target-prior", default=None,
                        help="uniform | train | FILE of C class weights, added as log prior to every head's bias")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="rebalance.x=y",
                        help="override a rebalance setting for this invocation (repeatable)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's train.device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    heads = rebalance(args.run_dir, heads=args.heads, overrides=args.overrides,
                      use_cache=False if args.no_cache else None, tau=args.tau, target_prior=args.target_prior,
                      device=args.device, progress=not args.quiet)
    from ltserve.rebalance.report import heads_table

    print(f"\nval metrics of {args.run_dir} (Many/Medium/Few: mean per-class accuracy by training count; "
          "All: top-1)\n")
    print(heads_table(val_summary(args.run_dir, heads)))
    print(f"\nheads written to {RunPaths(args.run_dir).heads}: {', '.join(heads)}")
    return 0
