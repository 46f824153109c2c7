"""Static int8: the folded fp32 graph -> a QDQ graph, calibrated on a class-balanced sample of training images.

    calibration_images(run, n, seed)   a class-balanced sample of the run's TRAIN split (never val or test),
                                       preprocessed exactly as export's verification images
    quantize_int8(src, dst, x, ...)    ONNX Runtime `quantize_static`: QDQ, per-channel int8 weights, uint8
                                       activations, MinMax ranges; the listed nodes stay float
    rank_sensitive(src, dst, x)        the quantised Conv / Gemm nodes, most sensitive first
    check_int8_head(model, head)       still exactly one Gemm producing the logits, holding (W / T, b / T) up to
                                       half a quantisation step

Settings, and why:
- QDQ (QuantizeLinear / DequantizeLinear pairs around float ops): ONNX Runtime fuses them into its integer kernels
  on CPU, the graph stays a standard ONNX graph with float32 input and output, and any runtime that ignores the
  pairs still computes the right function. The Predictor runs it unchanged.
- Per-channel weights: one scale per output channel, i.e. per class row of the folded head, so a tail class whose
  re-balanced row is small is not quantised on the scale of the largest head-class row.
- The head's output is never quantised (`OpTypesToExcludeOutputQuantization: Gemm`): 8-bit logits would tie
  near-equal classes and coarsen the calibrated probabilities.
- ncm's normalisation (Sub, ReduceL2, Clip, Div) stays float, as in fp16: a norm over D features is where 8 bits
  would lose the geometry ncm relies on.
- Which of the head Gemm and the first convolution (the stem) stay float was measured, not assumed
  (`python -m benchmarks.int8_placement`, results in benchmarks/results/<machine>/int8_placement/): see
  `DEFAULT_KEEP_FLOAT`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ltserve.errors import ConfigError, PackageError, QualityGateRefused
from ltserve.export.graph import INPUT_NAME, NORMALISATION_OPS, OUTPUT_NAME
from ltserve.features.cache import run_splits
from ltserve.heads import CalibratedHead
from ltserve.preprocess import to_model_input, transform_image

if TYPE_CHECKING:
    from ltserve.rundir import Run

log = logging.getLogger(__name__)

ROLES = ("head", "stem")
"""Node roles accepted wherever nodes to keep in float are named: the head Gemm, the first convolution."""
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ("head", "stem")
"""Kept float unless asked otherwise, decided by `python -m benchmarks.int8_placement` on the 2-core CPU box
(benchmarks/results/cpu-x86_64-2c/int8_placement/). On the embedded default (3 seeds x la, crt, tau_norm, ncm, the
whole test split), the mean changes are all within about 0.25 point, but the worst few-shot drop is 2.35 points
with every node int8, 1.05 with the head float, 1.55 with the stem float, and 0.80 with both. On ResNet-50 the head
costs nothing measurable in float, and the stem about a fifth of the int8 speed-up (still over 2x fp32 at batch
8). Both float: the smallest tail risk."""
CALIBRATION_IMAGES = 256
RETRY_FLOAT_COUNTS = (1, 2, 4, 8)
"""Retry r keeps the RETRY_FLOAT_COUNTS[r - 1] most sensitive quantised nodes in float as well."""
SENSITIVITY_IMAGES = 32
_CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Int8Options:
    """How `ltserve export --precision int8` quantises and what it accepts.

    Attributes:
        calibration_images: about this many training images, the same number per class (a class with fewer
            images gives all it has).
        seed: the calibration sample's seed.
        max_few_drop: refuse when few-shot accuracy drops by more than this (fraction: 0.01 = 1.0 point).
        max_all_drop: refuse when All (top-1) accuracy drops by more than this (fraction).
        retries: after a refused attempt, retry up to this many times keeping the most sensitive quantised nodes
            in float as well (1, 2, 4, 8 of them); 0 refuses at once.
        keep_float: nodes kept in float: roles ("head", "stem") or ONNX node names.
        reduce_range: 7-bit weights. Without VNNI, x86 int8 kernels add pairs of uint8 x int8 products in int16
            and can saturate; 7-bit weights cannot, so what export verified holds on any x86 CPU the package is
            served on. On by default: 8-bit weights measured no better per shot group (int8_placement: with the
            head and stem float, worst few-shot drop 0.80 points with 7 bits, 0.90 with 8).
    """

    calibration_images: int = CALIBRATION_IMAGES
    seed: int = 0
    max_few_drop: float = 0.01
    max_all_drop: float = 0.005
    retries: int = 3
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ConfigError(f"--calibration-images {self.calibration_images}: use at least 1 image per class")
        for name, value in (("--int8-max-few-drop", self.max_few_drop), ("--int8-max-all-drop", self.max_all_drop)):
            if not (0.0 <= value <= 1.0):
                raise ConfigError(f"{name} {value * 100:g}: give a drop in points between 0 and 100")
        if not (0 <= self.retries <= len(RETRY_FLOAT_COUNTS)):
            raise ConfigError(f"--int8-retries {self.retries}: choose 0..{len(RETRY_FLOAT_COUNTS)}")


@dataclass
class Calibration:
    """The calibration sample: model input (N, C, H, W) float32 and what model.json records about it."""

    x: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


def balanced_indices(labels: np.ndarray, total: int, seed: int) -> np.ndarray:
    """About `total` indices, the same number per class present (ceil(total / classes)); a class with fewer
    images gives them all, and with fewer than one image per class, `total` classes drawn at random give one each.
    Seeded; sorted int64 indices into `labels`."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if total < len(classes):
        classes = np.sort(rng.choice(classes, size=max(1, total), replace=False))
    per_class = max(1, math.ceil(total / max(1, len(classes))))
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)


def _sample(run: "Run", split: str, total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(model input (N, C, H, W) float32, labels (N,)) of a class-balanced sample of one split of the run,
    preprocessed as export's verification images (`transform_image` + `to_model_input` with the run's spec)."""
    images = getattr(run_splits(run), split)
    if images is None or len(images) == 0:
        raise PackageError(f"{run.paths.run_json}: the run has no {split} images to "
                           f"{'calibrate int8 on' if split == 'train' else 'rank layers on'}")
    idx = balanced_indices(images.labels, total, seed)
    spec = run.config.preprocess
    return to_model_input([transform_image(images.load(int(i)), spec) for i in idx], spec), images.labels[idx]


def calibration_images(run: "Run", total: int, seed: int) -> Calibration:
    """A class-balanced sample of the run's training split (never val or test), preprocessed as export's
    verification images.

    Raises:
        RunError: the data set on disk is not the run's (fingerprint).
        PackageError: the run has no training images.
    """
    x, labels = _sample(run, "train", total, seed)
    counts = np.bincount(labels, minlength=len(run.info.class_names))
    present = counts[counts > 0]
    record = {"split": "train", "images": int(len(x)), "seed": int(seed), "requested": int(total),
              "classes": int(len(present)), "per_class_min": int(present.min()), "per_class_max": int(present.max()),
              "data_fingerprint": run.info.data_fingerprint, "method": "MinMax"}
    return Calibration(x=x, record=record)


def ranking_images(run: "Run", total: int = SENSITIVITY_IMAGES, seed: int = 0) -> tuple[np.ndarray, str]:
    """Images to rank layers on: a class-balanced sample of the val split (the split the run chooses its knobs
    on), else of train. Not the calibration sample: on the images that set the ranges no value is clipped, and
    clipping is what a bad calibration costs. Not the test split, which accepts or refuses the result."""
    split = "val" if run_splits(run).val is not None and len(run_splits(run).val) else "train"
    return _sample(run, split, total, seed + 1)[0], split


def node_roles(model: Any) -> dict[str, str]:
    """{"head": name of the Gemm producing the logits, "stem": name of the first Conv reading the graph input}."""
    nodes = list(model.graph.node)
    roles = {}
    head = [n for n in nodes if n.op_type == "Gemm" and OUTPUT_NAME in n.output]
    if head:
        roles["head"] = head[0].name
    stem = [n for n in nodes if n.op_type == "Conv" and INPUT_NAME in n.input]
    if stem:
        roles["stem"] = stem[0].name
    return roles


def resolve_float_nodes(model: Any, keep: Sequence[str]) -> dict[str, str]:
    """Node names to keep in float -> why ("head", "stem", "asked for"), from roles or names.

    Raises:
        ConfigError: a name that is neither a role nor a node of the graph.
    """
    roles = node_roles(model)
    names = {n.name for n in model.graph.node}
    out: dict[str, str] = {}
    for item in keep:
        if item in ROLES:
            if item in roles:
                out[roles[item]] = item
        elif item in names:
            out[item] = "asked for"
        else:
            raise ConfigError(f"--keep-float {item!r}: not a role ({', '.join(ROLES)}) nor a node of model.onnx; "
                              "`ltserve inspect` lists the graph's ops, onnx.load(...).graph.node their names")
    return out


def _reader(x: np.ndarray, batch: int = _CALIBRATION_BATCH) -> Any:
    """An ONNX Runtime CalibrationDataReader over `x` in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                [{INPUT_NAME: x[i:i + batch]} for i in range(0, len(x), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Batches()


class _DropPreprocessHint(logging.Filter):
    """quantize_static logs, on the root logger, a hint to run its shape pre-processing first: the exported graph
    is already optimised and shaped (BatchNorm folded), so the hint is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage() and "pre_process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    filt = _DropPreprocessHint()
    root.addFilter(filt)
    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)
        for h in handlers:
            h.removeFilter(filt)


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, float_nodes: Sequence[str], *, reduce_range: bool,
                  cache: Path | None = None) -> dict[str, Any]:
    """Quantise the fp32 graph `src` into `dst` (QDQ, per-channel int8 weights, uint8 activations, MinMax).

    Args:
        src: the folded fp32 model.onnx.
        dst: where the int8 graph is written (one file).
        calib: calibration model input (N, C, H, W) float32.
        float_nodes: node names that stay float (ncm's normalisation nodes among them).
        reduce_range: 7-bit weights (see `Int8Options`).
        cache: a JSON file for the calibrated ranges: written by the first call, read by later ones (retries).

    Returns:
        the settings, for model.json.
    """
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = sorted(set(float_nodes))
    with _quiet_quantizer():
        quantize_static(str(src), str(dst), _reader(calib) if cache is None or not cache.is_file() else None,
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]})
    return {"tool": "onnxruntime.quantization.quantize_static", "onnxruntime": onnxruntime.__version__,
            "format": "QDQ", "weights": "int8, per channel", "activations": "uint8, per tensor",
            "reduce_range": bool(reduce_range), "calibrate_method": "MinMax", "head_output": "float"}


# ---------------------------------------------------------------------------------------------------------------------
# What the int8 graph holds
# ---------------------------------------------------------------------------------------------------------------------


def _dequantized(model: Any, tensor: str) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The value feeding `tensor`: a float initializer as is, or a DequantizeLinear of initializers dequantised.

    Returns (array or None, {"scale": (K,) or (), "axis": int} for a dequantised one, else None).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    if tensor in inits:
        return numpy_helper.to_array(inits[tensor]), None
    node = next((n for n in model.graph.node if tensor in n.output), None)
    if node is None or node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input[:2]):
        return None, None
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zp = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
          if len(node.input) > 2 and node.input[2] in inits else np.zeros_like(scale))
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if scale.ndim == 1 and q.ndim > 0:
        shape[axis] = -1
    return (q - zp.reshape(shape)) * scale.reshape(shape), {"scale": scale, "axis": axis}


def check_int8_head(model: Any, head: CalibratedHead, normalisation: Sequence[str] = ()) -> dict[str, Any]:
    """The int8 graph still ends in exactly one Gemm producing the logits, with (W / T, b / T) recovered within
    half a quantisation step per class row (or exactly when the head stayed float), and ncm's normalisation nodes
    (`normalisation`: their names in the fp32 graph) still there, in float.

    Returns:
        {"head_ops": [...], "head_weights": "int8 per class row" | "float", "head_max_abs_diff": float}.

    Raises:
        PackageError: any other structure.
    """
    fail = "model.onnx (int8): "
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    if len(gemms) != 1 or OUTPUT_NAME not in gemms[0].output:
        raise PackageError(fail + f"expected exactly one Gemm producing {OUTPUT_NAME!r} (a float output), found "
                           f"{len(gemms)} Gemm; the head output must not be quantised")
    gemm = gemms[0]
    weight, bias = head.folded()
    got_w, wq = _dequantized(model, gemm.input[1])
    has_bias = len(gemm.input) > 2 and gemm.input[2]
    got_b, bq = _dequantized(model, gemm.input[2]) if has_bias else (np.zeros_like(bias), None)
    if got_w is None or got_b is None or got_w.shape != weight.shape or got_b.shape != bias.shape:
        raise PackageError(fail + "the Gemm does not read the folded weights (W / T, b / T)")
    w_tol = (0.5 * wq["scale"].reshape(-1, 1) if wq else 0.0) + 1e-6 * np.abs(weight).max()
    b_tol = (0.5 * bq["scale"] if bq else 0.0) + 1e-6 * max(1.0, float(np.abs(bias).max()))
    w_diff, b_diff = np.abs(got_w - weight), np.abs(got_b - bias)
    if not (np.all(w_diff <= w_tol) and np.all(b_diff <= b_tol)):
        raise PackageError(fail + f"the Gemm's weights differ from (W / T, b / T) by more than half a quantisation "
                           f"step (max |diff| {float(w_diff.max()):.3g})")
    by_name = {n.name: n for n in model.graph.node}
    norm = [by_name[name] for name in normalisation if name in by_name]
    if head.feature_transform == "centred_l2" and [n.op_type for n in norm] != list(NORMALISATION_OPS):
        raise PackageError(fail + "ncm's normalisation (Sub, ReduceL2, Clip, Div) must stay float before the Gemm")
    return {"head_ops": [*(n.op_type for n in norm), "Gemm"],
            "head_weights": "int8 per class row" if wq else "float",
            "head_max_abs_diff": float(max(w_diff.max(), b_diff.max() if b_diff.size else 0.0))}


def quantised_nodes(model: Any) -> list[str]:
    """Conv / Gemm nodes of an int8 graph whose weights are dequantised int8 (what a retry may keep float)."""
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1
            and _dequantized(model, n.input[1])[1] is not None]


# ---------------------------------------------------------------------------------------------------------------------
# Sensitivity
# ---------------------------------------------------------------------------------------------------------------------


def rank_sensitive(src: Path, int8: Path, x: np.ndarray) -> list[dict]:
    """The quantised Conv / Gemm nodes of `int8`, most sensitive first.

    Sensitivity of a node = the noise-to-signal energy ratio int8 adds where the node reads: its input activation
    rounded and clipped to the graph's uint8 scale and zero point (on the images `x`, through the fp32 graph) plus
    its weights rounded to their per-channel int8 scales. One fp32 pass, no re-quantisation per node: a local
    measure, which does not see how much of a layer's noise survives to the logits.

    Returns:
        [{"node", "op", "input_nsr", "weight_nsr", "nsr"}], highest nsr first.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    qmodel = onnx.load(str(int8))
    fmodel = onnx.load(str(src))
    fnodes = {n.name: n for n in fmodel.graph.node}
    finits = {t.name: t for t in fmodel.graph.initializer}
    qinits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    q_of = {n.input[0]: n for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    rows = []
    for name in quantised_nodes(qmodel):
        fnode = fnodes.get(name)
        if fnode is None or fnode.input[1] not in finits:
            continue
        w = numpy_helper.to_array(finits[fnode.input[1]]).astype(np.float64)
        qnode = next(n for n in qmodel.graph.node if n.name == name)
        wq, _ = _dequantized(qmodel, qnode.input[1])
        qin = q_of.get(fnode.input[0])
        rows.append({"node": name, "op": fnode.op_type, "tensor": fnode.input[0],
                     "weight_nsr": float(((w - wq) ** 2).sum() / max((w ** 2).sum(), 1e-30)),
                     "scale": None if qin is None else float(qinits[qin.input[1]]),
                     "zero_point": None if qin is None else float(qinits[qin.input[2]])})
    tensors = sorted({r["tensor"] for r in rows if r["scale"] is not None})
    extra = [t for t in tensors if t not in {o.name for o in fmodel.graph.output}]
    fmodel.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in extra)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(fmodel.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    noise = dict.fromkeys(tensors, 0.0)
    signal = dict.fromkeys(tensors, 0.0)
    params = {r["tensor"]: (r["scale"], r["zero_point"]) for r in rows if r["scale"] is not None}
    for i in range(0, len(x), 4):  # a few images at a time: ResNet-50's activations are large
        values = session.run(tensors, {INPUT_NAME: x[i:i + 4]})
        for t, v in zip(tensors, values):
            scale, zp = params[t]
            v = v.astype(np.float64)
            fake = (np.clip(np.round(v / scale) + zp, 0, 255) - zp) * scale
            noise[t] += float(((v - fake) ** 2).sum())
            signal[t] += float((v ** 2).sum())
    for r in rows:
        t = r.pop("tensor")
        r["input_nsr"] = noise[t] / max(signal[t], 1e-30) if t in noise else 0.0
        r["nsr"] = r["input_nsr"] + r["weight_nsr"]
        del r["scale"], r["zero_point"]
    return sorted(rows, key=lambda r: -r["nsr"])


# ---------------------------------------------------------------------------------------------------------------------
# Quantise, verify per shot group, retry
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Int8Inputs:
    """What the int8 step compares against: the verification images and the fp32 graph's results on them."""

    fp32_path: Path
    split: str
    x: np.ndarray
    labels: np.ndarray
    fp32_logits: np.ndarray
    ref: np.ndarray
    normalisation: list[str]


def build_int8(run: "Run", head: CalibratedHead, inputs: Int8Inputs, dst: Path,
               options: Int8Options) -> dict[str, Any]:
    """Quantise the fp32 graph into `dst`, verify it per shot group against fp32, and retry keeping the most
    sensitive quantised nodes in float while it is refused (up to `options.retries` times).

    Returns:
        the report for model.json (`verification["int8"]`): the accepted attempt's comparison (see
        `compare_precision`), the calibration sample, the settings, the nodes kept in float and why, every attempt.

    Raises:
        QualityGateRefused (a PackageError): every attempt was refused; the message holds the per-group table of
            all attempts.
        RunError: the data set on disk is not the run's (the calibration sample comes from its training split).
    """
    import tempfile

    import onnx

    from ltserve.export.graph import check_model
    from ltserve.export.verify import compare_precision, int8_bounds, per_row_constant

    model = onnx.load(str(inputs.fp32_path))
    ops = {n.name: n.op_type for n in model.graph.node}
    calibration = calibration_images(run, options.calibration_images, options.seed)
    base = {**resolve_float_nodes(model, options.keep_float),
            **dict.fromkeys(inputs.normalisation, "ncm normalisation")}
    bounds = int8_bounds(options.max_few_drop, options.max_all_drop)
    attempts: list[dict[str, Any]] = []
    ranked: list[dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(prefix="ltserve-int8-") as work:
        cache = Path(work) / "ranges.json"  # calibrated once, reused by every retry
        added = 0
        for attempt in range(options.retries + 1):
            nodes = dict(base)
            if attempt:
                if ranked is None:
                    rank_x, rank_split = ranking_images(run, seed=options.seed)
                    ranked = rank_sensitive(inputs.fp32_path, dst, rank_x)
                extra = [r for r in ranked if r["node"] not in base][:RETRY_FLOAT_COUNTS[attempt - 1]]
                if len(extra) == added:
                    break  # every quantised node is float already: nothing left to try
                added = len(extra)
                nodes.update({r["node"]: f"sensitive #{i + 1}" for i, r in enumerate(extra)})
            settings = quantize_int8(inputs.fp32_path, dst, calibration.x, list(nodes),
                                     reduce_range=options.reduce_range, cache=cache)
            check_model(dst)
            graph = check_int8_head(onnx.load(str(dst)), head, inputs.normalisation)
            report = compare_precision("int8", dst, inputs.fp32_path, inputs.x, inputs.labels, inputs.fp32_logits,
                                       inputs.ref, per_row_constant(head), run.info, bounds)
            attempts.append({"attempt": attempt + 1, "float_nodes": nodes, "passed": report["passed"],
                             "failures": report["failures"], "top1_agreement_vs_fp32": report["top1_agreement_vs_fp32"],
                             "accuracy_fp32": report["accuracy_fp32"], "accuracy": report["accuracy"],
                             "accuracy_change": report["accuracy_change"]})
            log.info("int8 attempt %d (%d nodes float): %s", attempt + 1, len(nodes),
                     "accepted" if report["passed"] else "; ".join(report["failures"]))
            if report["passed"]:
                break
    if not attempts[-1]["passed"]:
        table = attempt_table(attempts, {**report["images_per_group"], "top1": len(inputs.x)})
        raise QualityGateRefused(
            f"int8 verification refused the quantised graph on {len(inputs.x)} {inputs.split} images (bounds: "
            f"few-shot drop <= {options.max_few_drop * 100:.2f} points, All drop <= "
            f"{options.max_all_drop * 100:.2f} points):\n{table}\n"
            "Keep more layers in float (--int8-retries, --keep-float NODE), calibrate on more images "
            "(--calibration-images), or loosen the bounds (--int8-max-few-drop, --int8-max-all-drop).")
    return {**report, "calibration": calibration.record, "settings": settings,
            "float_nodes": [{"node": n, "op": ops.get(n, "?"), "why": why}
                            for n, why in attempts[-1]["float_nodes"].items()],
            "graph": graph, "attempts": attempts,
            "sensitivity": None if ranked is None else {"images": int(len(rank_x)), "split": rank_split,
                                                        "measure": "local int8 noise / signal (input + weights)",
                                                        "top": ranked[:max(RETRY_FLOAT_COUNTS)]}}


def attempt_table(attempts: Sequence[dict[str, Any]], per_group: dict[str, int] | None = None) -> str:
    """The attempts as a plain-text table (`ltserve.export.verify.group_table`): nodes kept float, agreement, and
    each group's fp32 -> int8 accuracy with the change in points; a failed bound is marked with '!'."""
    from ltserve.export.verify import group_table

    return group_table(["attempt", "float nodes"], [([str(a["attempt"]), _short(a["float_nodes"])], a)
                                                    for a in attempts], "fp32", per_group)


def _short(float_nodes: dict[str, str]) -> str:
    """Nodes kept float, compactly: roles by role ("stem"), ncm's normalisation as one item, sensitive nodes as
    "#k NAME"."""
    parts = []
    for name, why in float_nodes.items():
        if why in ROLES:
            parts.append(why)
        elif why == "ncm normalisation":
            if "ncm normalisation" not in parts:
                parts.append("ncm normalisation")
        elif why.startswith("sensitive #"):
            parts.append(f"#{why.removeprefix('sensitive #')} {name}")
        else:
            parts.append(name)
    return ", ".join(parts) or "-"
