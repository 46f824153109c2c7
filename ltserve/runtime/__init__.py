"""The runtime: a model package in, predictions out, on ONNX Runtime or PyTorch. No torch at import.

    predictor.py    Predictor: load + verify a package, pick a runner, warm up, decode/preprocess/predict/postprocess
    prediction.py   Prediction (the HTTP and batch output schema), postprocess
    onnx_runner.py  OnnxRunner (model.onnx)
    torch_runner.py TorchRunner (model.pt2; imported only for backend="torch")
    buckets.py      the padded batch sizes
    prior.py        label shift: the live class prior estimated from the outputs (EM, BBSE), the adapt rule, windows
"""

from ltserve.runtime.prediction import Prediction, TopKEntry, postprocess
from ltserve.runtime.predictor import BACKENDS, Predictor

__all__ = ["BACKENDS", "Prediction", "Predictor", "TopKEntry", "postprocess"]
