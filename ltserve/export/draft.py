"""JPEG draft decoding (DCT-domain downscaling): decided per package at export, after a check per shot group.

With `PreprocessSpec.allow_draft`, `ltserve.preprocess.decode` lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8
scale (`Image.draft`, never below the model's resize) before the resize: several times cheaper on photos, and a
small change of the pixels the model sees. A package allows it only after export has measured that change:

    check_jpeg_draft(run, spec, model_path, options) -> the report model.json records (`verification["jpeg_draft"]`)

- which images it touches: the JPEGs of the verification split (test, else val; a stratified sample of
  `options.images`) that draft would decode at reduced scale (`preprocess.jpeg_draft_applies`, from the header);
  with none (Fashion-MNIST's in-memory images, PNGs, photos already near the model's size) draft stays off: nothing
  could verify it;
- the comparison: the package's own graph on every sampled image decoded exactly and, for the touched ones, with
  draft (`verify.compare_groups`, the comparison fp16 and int8 are accepted by): top-1 agreement and the Many /
  Medium / Few / All accuracy of both; every group's drop must stay within `options.max_drop` (0.3 point);
- the decision by mode: "auto" turns draft on when the check passes and keeps it off otherwise (logging the
  per-group table); "on" turns it on when the check passes and refuses the export otherwise (QualityGateRefused
  with the table; also when no image is touched); "off" keeps it off without a check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ltserve.data import ImageSet, stratified_subsample
from ltserve.errors import ConfigError, QualityGateRefused, unknown_choice
from ltserve.export.reference import verification_split
from ltserve.export.verify import TABLE_GROUPS, _run, _session, compare_groups, group_table
from ltserve.preprocess import PreprocessSpec, decode, jpeg_draft_applies, to_model_input

if TYPE_CHECKING:
    from ltserve.rundir import Run

log = logging.getLogger(__name__)

JPEG_DRAFT_MODES = ("auto", "on", "off")
DRAFT_IMAGES = 2000
"""The check's default sample of the verification split (as int8's: a bound of 0.3 point needs many images)."""
DRAFT_MAX_DROP = 0.003
"""No group's accuracy (Many, Medium, Few, All) may drop by more than 0.3 point with draft decoding."""
_BATCH = 64
NO_IMAGE_AFFECTED = "no image of the split would be decoded differently"


@dataclass(frozen=True)
class JpegDraftOptions:
    """What `ltserve export --jpeg-draft` does and accepts.

    Attributes:
        mode: "auto" (on when the check passes, else off), "on" (on when the check passes, else refuse the export)
            or "off" (off, no check).
        max_drop: the largest drop of Many, Medium, Few and All accuracy allowed (fraction: 0.003 = 0.3 point). A
            negative bound demands a gain of at least that much (it refuses any draft that only keeps accuracy).
        images: the sample of the verification split the check decodes both ways (stratified, every class).
    """

    mode: str = "auto"
    max_drop: float = DRAFT_MAX_DROP
    images: int = DRAFT_IMAGES

    def __post_init__(self) -> None:
        if self.mode not in JPEG_DRAFT_MODES:
            raise ConfigError(unknown_choice("--jpeg-draft", self.mode, JPEG_DRAFT_MODES))
        if not -1.0 <= self.max_drop <= 1.0:
            raise ConfigError(f"--jpeg-draft-max-drop {self.max_drop * 100:g}: give a drop in points between -100 "
                              "and 100")
        if self.images < 1:
            raise ConfigError(f"--jpeg-draft-images {self.images}: check on at least 1 image")


def _affected(images: ImageSet, idx: np.ndarray, resize: int) -> np.ndarray:
    """Positions into `idx` of the images draft would decode at reduced scale (headers only)."""
    if images.paths is None:  # in-memory arrays: served as PNG or raw pixels, never as JPEG
        return np.zeros(0, np.int64)
    return np.asarray([k for k, i in enumerate(idx) if jpeg_draft_applies(images.read_bytes(int(i)), resize)],
                      dtype=np.int64)


def _logits(session: Any, images: ImageSet, idx: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """The graph's logits (N, K) on the images decoded with `spec`, and the decoded pixels (N, crop, crop, C) uint8;
    decoded and run in batches, so only one batch of float input is held at a time."""
    out, pixels = [], []
    for start in range(0, len(idx), _BATCH):
        batch = [decode(images.read_bytes(int(i)), spec) for i in idx[start:start + _BATCH]]
        out.append(_run(session, to_model_input(batch, spec)))
        pixels.append(np.stack(batch))
    return np.concatenate(out), np.concatenate(pixels)


def check_jpeg_draft(run: "Run", spec: PreprocessSpec, model_path: Path, options: JpegDraftOptions) -> dict[str, Any]:
    """Decide whether the package allows JPEG draft decoding, and say why (see the module docstring).

    Args:
        run: the run being exported (its verification split, class counts and shot thresholds).
        spec: the package's preprocessing (its allow_draft is ignored: this decides it).
        model_path: the graph the package ships (after fp16 / int8), run on both decodes.
        options: mode, bound and sample size.

    Returns:
        the report for model.json: mode, decision ("on" or "off"), reason, split, images checked and affected, and
        when any was affected the comparison (`verify.compare_groups` with base "exact": agreement, each group's
        accuracy exact and with draft, the change), the mean |pixel difference| of the affected images (uint8
        levels, after resize and crop) and "passed".

    Raises:
        QualityGateRefused (a PackageError): mode "on" and the check failed or could not run (no image affected);
            the message holds the per-group table.
    """
    report: dict[str, Any] = {"mode": options.mode, "decision": "off", "resize": spec.resize,
                              "max_accuracy_drop": {k: options.max_drop for k in TABLE_GROUPS}}
    if options.mode == "off":
        return {**report, "reason": "not checked: --jpeg-draft off"}
    split, images, _ = verification_split(run.config.data)
    idx = stratified_subsample(images.labels, options.images, seed=0)
    affected = _affected(images, idx, spec.resize)
    report.update(split=split, images=int(len(idx)), images_affected=int(len(affected)))
    if not len(affected):
        reason = (f"{NO_IMAGE_AFFECTED} (no JPEG of the {len(idx)} {split} images checked has a shorter side of at "
                  f"least 2 x resize = {2 * spec.resize} px)")
        if options.mode == "on":
            raise QualityGateRefused(f"--jpeg-draft on: {reason}, so the check cannot verify draft decoding; "
                                     "export with --jpeg-draft auto or off")
        log.info("JPEG draft decoding stays off: %s", reason)
        return {**report, "reason": reason}
    exact_spec = spec.model_copy(update={"allow_draft": False})
    draft_spec = spec.model_copy(update={"allow_draft": True})
    session = _session(model_path)
    exact, exact_px = _logits(session, images, idx, exact_spec)
    drafted, draft_px = _logits(session, images, idx[affected], draft_spec)
    logits = exact.copy()
    logits[affected] = drafted
    labels = images.labels[idx]
    comparison = compare_groups(logits, exact, labels, run.info, report["max_accuracy_drop"], base="exact")
    diff = float(np.abs(draft_px.astype(np.int16) - exact_px[affected].astype(np.int16)).mean())
    passed = not comparison["failures"]
    report.update(comparison, mean_abs_pixel_diff=diff, passed=passed)
    table = group_table(["decode"], [(["draft vs exact"], comparison)], "exact",
                        {**comparison["images_per_group"], "top1": len(idx)})
    if passed:
        report.update(decision="on", reason=f"every group within {options.max_drop * 100:.2f} points on "
                      f"{len(affected)} affected of {len(idx)} {split} images")
        log.info("JPEG draft decoding on: %s\n%s", report["reason"], table)
        return report
    reason = "; ".join(comparison["failures"])
    if options.mode == "on":
        raise QualityGateRefused(f"--jpeg-draft on refused: draft decoding changes accuracy on {len(affected)} "
                                 f"affected of {len(idx)} {split} images beyond the bound (a drop of at most "
                                 f"{options.max_drop * 100:.2f} points per group): {reason}\n{table}\nExport with "
                                 "--jpeg-draft auto or off, or loosen --jpeg-draft-max-drop.")
    log.warning("JPEG draft decoding stays off: %s\n%s", reason, table)
    return {**report, "reason": reason}
