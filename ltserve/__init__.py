"""ltserve: decoupled long-tailed image classification, folded into one Gemm and served over HTTP."""

__version__ = "0.1.0"
