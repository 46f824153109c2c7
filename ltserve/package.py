"""The model package: `model.onnx` (+ optional `model.pt2`) and `model.json`, what export writes and serving reads.

`ModelJson` is the schema of `model.json`. `write_package` is its one writer (export, the benchmarks and the tests
all build packages through it); `load_package` validates it and every listed file's sha256, so a corrupted, swapped
or missing file is caught before a session is built. No torch, no onnxruntime here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ltserve import __version__
from ltserve.errors import PackageError
from ltserve.fileio import atomic_write_text, sha256_file
from ltserve.metrics import ShotGroup, shot_groups
from ltserve.open_set import FEATURE_SCORES, SCORES
from ltserve.preprocess import PreprocessSpec
from ltserve.rundir import git_commit, utc_now

PACKAGE_SCHEMA_VERSION = 1
MODEL_JSON = "model.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShotThresholds(_Strict):
    many: int = 100
    few: int = 20


class HeadInfo(_Strict):
    """Which head was folded, with the parameters that define it."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict, description="tau, tau_la, target_prior, scales summary, ...")
    temperature: float = 1.0


class Provenance(_Strict):
    ltserve_version: str
    git_commit: str | None = None
    config_hash: str | None = None
    created: str
    command: str | None = None
    run: str | None = None


class FileEntry(_Strict):
    sha256: str
    bytes: int


Precision = Literal["fp32", "fp16", "int8"]
"""The stored weights: float32, float16, or int8 (QDQ: static int8 weights and uint8 activations). The graph's input
and output are float32 in every case."""
PRECISIONS: tuple[str, ...] = get_args(Precision)


class GraphInfo(_Strict):
    opset: int
    nodes: int
    op_counts: dict[str, int] = Field(default_factory=dict)
    precision: Precision = "fp32"


class LabelShiftInfo(_Strict):
    """What label-shift estimation (`ltserve.runtime.prior`) needs from export, measured on a labelled split: the
    head's confusion matrix (BBSE) and its class-wise bias (EM). Packages from before it have none
    (`ModelJson.label_shift` is None): EM then trusts the head's calibration, and BBSE is unavailable."""

    split: str = Field("val", description="the split it was measured on (the run's balanced val split)")
    n: int = Field(description="images counted")
    confusion: list[list[int]] = Field(description="C x C counts: rows the true class, columns the predicted class "
                                                   "(the argmax of the package's logits)")
    bias: list[float] | None = Field(None, description="C logit offsets (nats, mean 0) that calibrate the served "
                                     "probabilities class by class; zeros when the split shows no bias beyond chance")
    bias_test: dict[str, Any] = Field(default_factory=dict, description="the likelihood-ratio test behind `bias`: "
                                      "statistic, dof, p_value, alpha, shrinkage, applied, fitted")


class OpenSetInfo(_Strict):
    """Open-set rejection calibrated at export (`ltserve.open_set`): which score, and the per-class thresholds that
    accept `target` of the known val images in every shot group. Packages from before it have none
    (`ModelJson.open_set` is None): the runtime then offers no open-set answers."""

    score: str = Field(description="msp | energy | max_logit | ncm_cosine | mahalanobis (higher = less like the "
                       "training classes)")
    chosen_by: str = Field(description="why this score: the export rule or the --open-set-score override")
    target: float = Field(gt=0.0, lt=1.0, description="share of known val images accepted in every shot group")
    thresholds: list[float] = Field(description="C thresholds: an image is unknown when its score exceeds the "
                                    "threshold of its predicted class")
    threshold_source: list[str] = Field(description="C of class (its own val images) | group (its shot group's) | "
                                        "all (every val image: the group had too few)")
    group_thresholds: dict[str, float | None] = Field(default_factory=dict)
    split: str = "val"
    n: int = Field(description="val images calibrated on")
    val_accepted: dict[str, Any] = Field(default_factory=dict, description="share of val images accepted per shot "
                                         "group, by predicted and by true class")
    candidates: dict[str, Any] = Field(default_factory=dict, description="every score the package can compute "
                                       "and its val acceptance per group at its own thresholds")
    stats_key: str | None = Field(None, description="the model.onnx metadata entry holding the feature scores' "
                                  "statistics (ltserve.open_set_stats), when the graph has a features output")


class ModelJson(_Strict):
    """Contents of `model.json`."""

    schema_version: int = PACKAGE_SCHEMA_VERSION
    name: str
    labels: list[str]
    class_counts: list[int]
    shot_groups: list[ShotGroup]
    shot_thresholds: ShotThresholds = Field(default_factory=ShotThresholds)
    preprocess: PreprocessSpec
    head: HeadInfo
    metrics: dict[str, Any] = Field(default_factory=dict)
    verification: dict[str, Any] = Field(default_factory=dict)
    graph: GraphInfo
    provenance: Provenance
    files: dict[str, FileEntry]
    input_name: str = "input"
    output_name: str = "logits"
    label_shift: LabelShiftInfo | None = None
    features_name: str | None = None
    """The graph's second output, the penultimate features (N, D), or None (graph has logits only)."""
    open_set: OpenSetInfo | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelJson":
        n = len(self.labels)
        if n == 0:
            raise ValueError("labels is empty")
        if len(self.class_counts) != n or len(self.shot_groups) != n:
            raise ValueError(f"labels ({n}), class_counts ({len(self.class_counts)}) and shot_groups "
                             f"({len(self.shot_groups)}) must have the same length")
        if "model.onnx" not in self.files:
            raise ValueError("files must list model.onnx")
        draft = self.verification.get("jpeg_draft")
        if isinstance(draft, dict) and (draft.get("decision") == "on") != self.preprocess.allow_draft:
            # export decides allow_draft from its check (ltserve.export.draft): the two never differ in a package
            # it wrote, and a hand edit must not turn an unverified faster path on
            raise ValueError(f"preprocess.allow_draft is {self.preprocess.allow_draft} but verification.jpeg_draft "
                             f"decided {draft.get('decision')!r}; re-export the package")
        if self.label_shift is not None:
            k = self.label_shift.confusion
            if len(k) != n or any(len(row) != n for row in k) or any(v < 0 for row in k for v in row):
                raise ValueError(f"label_shift.confusion must be {n} x {n} counts >= 0 (one row and column per "
                                 "label); re-export the package")
            if self.label_shift.bias is not None and len(self.label_shift.bias) != n:
                raise ValueError(f"label_shift.bias must hold {n} values (one per label); re-export the package")
        if self.open_set is not None:
            _check_open_set(self)
        return self


def _check_open_set(meta: "ModelJson") -> None:
    o, n = meta.open_set, len(meta.labels)
    if o.score not in SCORES:
        raise ValueError(f"open_set.score {o.score!r} is not one of {', '.join(SCORES)}; re-export the package")
    if len(o.thresholds) != n or len(o.threshold_source) != n:
        raise ValueError(f"open_set.thresholds and threshold_source must hold {n} values (one per label)")
    if o.score in FEATURE_SCORES and (meta.features_name is None or o.stats_key is None):
        raise ValueError(f"open_set.score {o.score!r} needs the graph's features output and its statistics "
                         "(features_name, open_set.stats_key); re-export the package")


def read_model_json(model_dir: str | Path) -> ModelJson:
    """Parse and validate `model.json` (no hash check).

    Raises:
        PackageError: missing or invalid (names the path and the problem).
    """
    path = Path(model_dir) / MODEL_JSON
    if not Path(model_dir).is_dir():
        raise PackageError(f"{model_dir}: model package not found (export one with "
                           f"`ltserve export runs/NAME --head HEAD --out {model_dir}`)")
    if not path.is_file():
        raise PackageError(f"{path}: not found; {model_dir} is not a model package")
    try:
        return ModelJson.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as exc:
        raise PackageError(f"{path}: invalid model.json: {exc}") from None


def verify_files(model_dir: str | Path, meta: ModelJson) -> None:
    """Check that every file listed in `meta.files` exists with the recorded size and sha256.

    Raises:
        PackageError: naming the first file that is missing or differs.
    """
    root = Path(model_dir)
    for name, entry in meta.files.items():
        path = root / name
        if not path.is_file():
            raise PackageError(f"{path}: listed in model.json but missing; re-export the package")
        size = path.stat().st_size
        if size != entry.bytes or sha256_file(path) != entry.sha256:
            raise PackageError(f"{path}: sha256 does not match model.json (file corrupted or swapped); "
                               "re-export the package")


def load_package(model_dir: str | Path, verify: bool = True) -> ModelJson:
    """Read `model.json` and (by default) verify every file's sha256."""
    meta = read_model_json(model_dir)
    if verify:
        verify_files(model_dir, meta)
    return meta


def file_entries(model_dir: str | Path, names: list[str]) -> dict[str, FileEntry]:
    """sha256 and size of each named file in the package folder."""
    root = Path(model_dir)
    return {n: FileEntry(sha256=sha256_file(root / n), bytes=(root / n).stat().st_size) for n in names}


def onnx_opset(model: Any) -> int:
    """The default-domain opset of an ONNX ModelProto."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def graph_info(model: Any, precision: Precision = "fp32") -> GraphInfo:
    """Opset, node count, op counts (sorted by op name) and precision of an ONNX ModelProto (no onnx import here)."""
    ops = Counter(n.op_type for n in model.graph.node)
    return GraphInfo(opset=onnx_opset(model), nodes=len(model.graph.node), op_counts=dict(sorted(ops.items())),
                     precision=precision)


def write_package(model_dir: str | Path, *, name: str, labels: Sequence[str], class_counts: Sequence[int],
                  preprocess: PreprocessSpec, head: HeadInfo, graph: GraphInfo, files: Sequence[str],
                  thresholds: ShotThresholds | None = None, metrics: dict[str, Any] | None = None,
                  verification: dict[str, Any] | None = None, command: str | None = None, run: str | None = None,
                  config_hash: str | None = None, label_shift: LabelShiftInfo | None = None,
                  features_name: str | None = None, open_set: OpenSetInfo | None = None) -> ModelJson:
    """Describe the files already in `model_dir` and write `model.json`: the one writer of the package schema.

    Shot groups come from the training counts and thresholds, every listed file gets its sha256 and size, and
    provenance records this ltserve version, the git commit, the time, the command and the run. The file is written
    atomically after the files it lists, then read back and verified (schema and every sha256).

    Args:
        files: the package's files, model.onnx first (e.g. ["model.onnx", "model.pt2"]).
        label_shift: the head's val confusion matrix (for label-shift estimation), or None.
        features_name: the graph's features output, or None.
        open_set: the open-set score and thresholds calibrated at export, or None.

    Returns:
        the ModelJson written.

    Raises:
        PackageError: the description does not validate, or a listed file does not verify.
    """
    thresholds = thresholds or ShotThresholds()
    try:
        meta = ModelJson(
            name=name, labels=list(labels), class_counts=list(class_counts),
            shot_groups=shot_groups(class_counts, thresholds.many, thresholds.few), shot_thresholds=thresholds,
            preprocess=preprocess, head=head, metrics=metrics or {}, verification=verification or {}, graph=graph,
            provenance=Provenance(ltserve_version=__version__, git_commit=git_commit(), config_hash=config_hash,
                                  created=utc_now(), command=command, run=run),
            files=file_entries(model_dir, list(files)), label_shift=label_shift, features_name=features_name,
            open_set=open_set)
    except ValidationError as exc:
        raise PackageError(f"{model_dir}: invalid package description: {exc}") from None
    # no `label_shift: null` (or open-set) key: a package without it stays readable by an ltserve from before the field
    absent = {k for k, v in (("label_shift", label_shift), ("features_name", features_name), ("open_set", open_set))
              if v is None}
    atomic_write_text(Path(model_dir) / MODEL_JSON, meta.model_dump_json(indent=2, exclude=absent or None))
    return load_package(model_dir, verify=True)
