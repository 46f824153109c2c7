"""The ONNX graph: torch.export -> one-file ONNX with a symbolic batch, its structure checked, fp16 conversion.

Exporter: `torch.export.export` (dynamic batch) -> `torch.onnx.export(..., dynamo=True, external_data=False)`, whose
onnxscript optimiser constant-folds the graph (BatchNorm folded into Conv, one Gemm with transB=1 for the head). The
legacy TorchScript exporter is ~20x faster on a CIFAR ResNet (0.05 s vs ~1 s) but deprecated and leaves Identity
nodes in the graph; the same ExportedProgram also gives `model.pt2`, so the dynamo path is the one kept. Opset >= 18.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ltserve.errors import ConfigError, PackageError
from ltserve.heads import CalibratedHead
from ltserve.package import onnx_opset

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 18
"""The dynamo exporter writes opset 18 or newer (older requests are silently kept at 18, so they are refused)."""
NORMALISATION_OPS = ("Sub", "ReduceL2", "Clip", "Div")
"""The ops of ncm's fixed centring + L2 normalisation, in graph order, before the Gemm."""
MAX_BATCH = 1 << 16


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's optimiser logs every pass at INFO (and warns about things export checks itself): keep
    those loggers at WARNING / ERROR while exporting, restoring their levels after."""
    levels = {name: logging.getLogger(name).level for name in _EXPORTER_LOGGERS}
    for name, level in _EXPORTER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


_EXPORTER_LOGGERS = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.ERROR,
                     "torch.export": logging.ERROR, "torch._export": logging.ERROR}


def _export_program(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # a backbone that cannot trace with a dynamic batch
        raise PackageError(f"torch.export of the model failed ({type(exc).__name__}: {exc}); the backbone must "
                           "trace with a symbolic batch dimension") from exc


def _write_onnx(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path,
                opset: int | None) -> None:
    """ExportedProgram -> one-file ONNX at `path` (constant-folded, batch dimension named "batch")."""
    import onnx

    torch.onnx.export(program, (example,), str(path), dynamo=True, external_data=False, optimize=True,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, verbose=False)
    model = onnx.load(str(path))
    got = onnx_opset(model)
    if opset is not None and got != opset:
        raise ConfigError(f"--opset {opset}: the exporter produced opset {got}; choose an opset the installed "
                          f"torch/onnxscript support (>= {MIN_OPSET})")
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise PackageError(f"{path}: the batch dimension was frozen to {dim.dim_value}; export needs a symbolic batch")
    old = dim.dim_param
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = "batch"
    # per-node export metadata holds stack traces with this machine's paths: not part of the model
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info, *model.graph.initializer]:
        del value.metadata_props[:]
    onnx.save(model, str(path))


def check_head_subgraph(model: Any, head: CalibratedHead) -> dict[str, Any]:
    """Assert the graph ends in exactly the folded head: one Gemm holding (W / T, b / T), for ncm preceded by the
    normalisation chain holding mu, and nothing else after the backbone's pooled features.

    Returns:
        {"head_ops": [...], "backbone_nodes": int}.

    Raises:
        PackageError: any other structure (e.g. MatMul + Add, a second Gemm, a missing normalisation node).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    fail = "model.onnx: "
    if len(gemms) != 1 or gemms[0].output[0] != OUTPUT_NAME:
        raise PackageError(fail + f"expected exactly one Gemm producing {OUTPUT_NAME!r}, found "
                           f"{[n.op_type for n in graph.node if n.output[0] == OUTPUT_NAME]} and {len(gemms)} Gemm")
    gemm = gemms[0]
    attrs = {a.name: a for a in gemm.attribute}
    weight, bias = head.folded()
    got_w = inits.get(gemm.input[1])
    # the optimiser drops an all-zero bias (tau_norm without bias): still one Gemm, C absent
    got_b = inits.get(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else np.zeros_like(bias)
    if got_w is not None and not (attrs["transB"].i if "transB" in attrs else 0):
        got_w = got_w.T
    trans_a = attrs["transA"].i if "transA" in attrs else 0
    if trans_a or any(attrs[k].f != 1.0 for k in ("alpha", "beta") if k in attrs):
        raise PackageError(fail + "the Gemm must be x W^T + b (transA=0, alpha=beta=1)")
    if (got_w is None or got_w.shape != weight.shape or got_b.shape != bias.shape
            or not (np.allclose(got_w, weight, rtol=1e-6, atol=0) and np.allclose(got_b, bias, rtol=1e-6, atol=1e-12))):
        raise PackageError(fail + "the Gemm does not hold the folded weights (W / T, b / T)")
    head_nodes = [gemm]
    if head.feature_transform == "centred_l2":
        head_nodes = _normalisation_chain(producer, inits, gemm.input[0], head, fail) + head_nodes
    return {"head_ops": [n.op_type for n in head_nodes], "head_nodes": [n.name for n in head_nodes],
            "backbone_nodes": len(graph.node) - len(head_nodes)}


def _normalisation_chain(producer: dict, inits: dict, gemm_in: str, head: CalibratedHead, fail: str) -> list:
    """Match Div(Sub(F, mu), Clip(ReduceL2(Sub))) feeding the Gemm; return the nodes in NORMALISATION_OPS order."""
    div = producer.get(gemm_in)
    sub = producer.get(div.input[0]) if div is not None and div.op_type == "Div" else None
    clip = producer.get(div.input[1]) if sub is not None else None
    red = producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else None
    ok = (sub is not None and sub.op_type == "Sub" and red is not None and red.op_type == "ReduceL2"
          and red.input[0] == sub.output[0] and sub.input[1] in inits
          and np.allclose(inits[sub.input[1]].reshape(-1), head.centre, rtol=1e-6, atol=1e-7))
    if not ok:
        raise PackageError(fail + "expected the normalisation Sub(mu) -> ReduceL2 -> Clip -> Div before the Gemm")
    return [sub, red, clip, div]


def export_onnx(module: nn.Module, x: np.ndarray, path: Path, opset: int | None) -> torch.export.ExportedProgram:
    """torch.export the folded module (symbolic batch) and write its ONNX graph; returns the program (for pt2)."""
    example = torch.from_numpy(np.array(x[:2]))  # batch >= 2, or torch.export specialises the batch to 1
    with _quiet_exporter():
        program = _export_program(module, example)
        _write_onnx(program, example, path, opset)
    return program


def check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise PackageError(f"{path.name}: onnx.checker failed: {exc}") from exc


def to_fp16(src: Path, dst: Path, head_check: dict[str, Any]) -> None:
    """float16 weights, float32 input/output. ncm's normalisation nodes compute in float32 (the converter casts their
    inputs back): a sum of squares over D features can overflow float16's 65504."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    keep = [name for name, op in zip(head_check["head_nodes"], head_check["head_ops"]) if op in NORMALISATION_OPS]
    with warnings.catch_warnings():
        # "the float32 number ... will be truncated to 1e-07": tiny constants (the 1e-12 norm floor, tiny weights)
        # are clamped to float16's range on purpose; the accuracy check below measures the effect
        warnings.filterwarnings("ignore", message=".*will be truncated to", category=UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep or None)
    onnx.save(converted, str(dst))



def add_features_output(path: Path, head: CalibratedHead, name: str = "features") -> str:
    """Expose the penultimate features (the tensor the head reads: the Gemm's input, or for ncm the normalisation
    chain's) as a second graph output named `name`, (batch, D) float32. No node is added or changed but for the
    tensor's name, so the fold and its check are untouched; the open-set feature scores read it.

    Returns:
        `name`.

    Raises:
        PackageError: the head sub-graph is not the folded head (`check_head_subgraph`).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    first = check_head_subgraph(model, head)["head_nodes"][0]
    node = next(n for n in model.graph.node if n.name == first)
    old = node.input[0]
    if any(o.name == name for o in model.graph.output) or old in {i.name for i in model.graph.input}:
        raise PackageError(f"{path.name}: cannot expose the features as output {name!r}")
    for n in model.graph.node:
        n.input[:] = [name if x == old else x for x in n.input]
        n.output[:] = [name if x == old else x for x in n.output]
    for v in model.graph.value_info:
        if v.name == old:
            v.name = name
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", head.num_features]))
    onnx.save(model, str(path))
    return name


def remove_output(path: Path, name: str) -> None:
    """Drop graph output `name` (the tensor stays, feeding its consumers): fp16 and int8 conversion run on the graph
    with logits as its one output, and `expose_output` adds the features back after."""
    import onnx

    model = onnx.load(str(path))
    kept = [o for o in model.graph.output if o.name != name]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(path))


def expose_output(path: Path, name: str, width: int) -> None:
    """Make tensor `name` a graph output (batch, width), float32 like every output: no node is added where the
    converted graph computes it in float32 (int8's QDQ graph); an fp16 graph gets one Cast to float32 after it (the
    internal float16 tensor is renamed `<name>_fp16`)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    if not any(name in n.output for n in model.graph.node):
        raise PackageError(f"{path.name}: no node produces {name!r} after conversion; cannot expose the features")
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = next((v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == name),
                TensorProto.FLOAT)
    if elem != TensorProto.FLOAT:
        inner = f"{name}_fp16"
        for n in model.graph.node:
            n.input[:] = [inner if x == name else x for x in n.input]
            n.output[:] = [inner if x == name else x for x in n.output]
        model.graph.node.append(helper.make_node("Cast", [inner], [name], name=f"{name}_to_float32",
                                                 to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]))
    onnx.save(model, str(path))
