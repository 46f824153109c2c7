"""Real model packages for the serving tests, independent of train/rebalance/export.

`write_gemm_package` writes a real ONNX graph (input float32 [N, C, H, W] -> Flatten -> Gemm(W, b) -> logits) and a
valid, hashed model.json through `ltserve.package.write_package`, the writer export uses. `build_lsq_package` fits W, b by seeded ridge least squares on
Fashion-MNIST training images (one-hot targets), so its predictions mean something (~80 % test accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ltserve.data import find_fashion_mnist

FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
# Long-tailed training counts (n_max 1000, rho 100) so that the package has many, medium and few-shot classes.
LT_COUNTS = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]


def read_fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) int64 of 'train' or 't10k'."""
    from ltserve.data import read_idx

    folder = find_fashion_mnist()
    images = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def write_gemm_package(out: Path, weight: np.ndarray, bias: np.ndarray, spec, labels: Sequence[str],
                       class_counts: Sequence[int], name: str = "gemm-test", metrics: dict | None = None,
                       pt2: bool = False) -> Path:
    """Write model.onnx (Flatten -> Gemm) and model.json into `out` (and model.pt2, the same graph, when `pt2`).

    Args:
        weight: (C, D) with D = channels * crop * crop (NCHW flattening order).
        bias: (C,).
        spec: the package's PreprocessSpec.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ltserve.package import HeadInfo, graph_info, write_package

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c, d = weight.shape
    assert d == spec.channels * spec.crop * spec.crop
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], transB=1)],
        "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", spec.channels, spec.crop, spec.crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", c])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W"),
                     numpy_helper.from_array(bias.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ltserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out / "model.onnx"))
    if pt2:
        write_gemm_pt2(out / "model.pt2", weight, bias, spec)
    write_package(out, name=name, labels=labels, class_counts=class_counts, preprocess=spec,
                  head=HeadInfo(name="lstsq", params={"fit": "ridge least squares, one-hot targets"}),
                  metrics=metrics, graph=graph_info(model), files=["model.onnx", *(["model.pt2"] if pt2 else [])],
                  command="tests/package_helpers.py")
    return out


def write_gemm_pt2(path: Path, weight: np.ndarray, bias: np.ndarray, spec) -> None:
    """model.pt2 for the torch backend: Flatten -> Linear, a dynamic batch of 1..1024, like the exporter's."""
    import torch

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        layer.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    module = torch.nn.Sequential(torch.nn.Flatten(), layer).eval()
    x = torch.zeros((2, spec.channels, spec.crop, spec.crop))
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    program.example_inputs = None
    torch.export.save(program, str(path))


def build_lsq_package(out: Path, n_train: int = 12000, seed: int = 0, ridge: float = 10.0) -> Path:
    """A Fashion-MNIST package whose Gemm is a seeded ridge least-squares fit on `n_train` training images."""
    from ltserve.preprocess import PreprocessSpec, to_model_input

    spec = PreprocessSpec(resize=28, crop=28, interpolation="bilinear", mean=(0.286,), std=(0.353,), channels=1)
    images, labels = read_fashion("train")
    idx = np.random.default_rng(seed).choice(len(images), size=n_train, replace=False)
    x = to_model_input(list(images[idx][..., None]), spec).reshape(n_train, -1).astype(np.float64)
    x = np.concatenate([x, np.ones((n_train, 1))], axis=1)
    y = np.eye(10)[labels[idx]]
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)  # (D + 1, C)
    w *= 10.0  # least-squares scores lie in ~[0, 1]: sharpen them into logits with confident probabilities
    test_images, test_labels = read_fashion("t10k")
    tx = to_model_input(list(test_images[..., None]), spec).reshape(len(test_images), -1).astype(np.float64)
    top1 = float(np.mean((tx @ w[:-1] + w[-1]).argmax(1) == test_labels))
    return write_gemm_package(out, w[:-1].T, w[-1], spec, FASHION_LABELS, LT_COUNTS, name="fashion-lsq",
                              metrics={"test": {"top1": top1}})


def build_random_rgb_package(out: Path, size: int = 32, num_classes: int = 5, seed: int = 0,
                             allow_draft: bool = False, pt2: bool = False) -> Path:
    """A 3-channel package with random Gemm weights (for colour paths: RGB, CMYK, RGBA, draft)."""
    from ltserve.preprocess import PreprocessSpec

    spec = PreprocessSpec(resize=size + size // 7, crop=size, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), channels=3, allow_draft=allow_draft)
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.05, size=(num_classes, 3 * size * size))
    bias = rng.normal(0, 0.1, size=num_classes)
    labels = [f"class_{j}" for j in range(num_classes)]
    counts = [500, 150, 60, 30, 5][:num_classes] + [50] * max(0, num_classes - 5)
    return write_gemm_package(out, weight, bias, spec, labels, counts, name="random-rgb", pt2=pt2)
