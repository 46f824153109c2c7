"""Learnable weight scaling, LWS (Kang et al. 2020, sec. 4): the joint W and b stay fixed; one scale f_j per class,
initialised to 1, is learnt with class-balanced sampling; logits_j = f_j (w_j . x + b_j) (the bias is scaled too).
Folded: W'_j = f_j W_j, b'_j = f_j b_j.

The scales are learnt as log-scales, f_j = exp(s_j) with s_j initialised to 0, so every f_j stays positive. The
paper's code learns f_j directly, and then a class whose joint logit is negative on its own training images (a
rare class the joint head learnt to push down, e.g. one training image at rho 400) can only raise that logit by
turning f_j negative: the class's logit is then reversed for every input (seen on Fashion-MNIST-LT, rho 400: scales
-0.79 for the two rarest classes, one of them never predicted on 10,000 test images). A positive scale keeps each
row's direction and only re-weights it, which is what LWS is for. Weight decay acts on s (as the paper's code
applies it to f), so it now pulls every f_j towards 1, the joint head, rather than towards 0.

A scale can still end tiny: exp(s) approaches 0 when the class is better off with a logit near 0 for every input,
which silences the class's features. `scale_check` flags every f_j below TINY_SCALE times the largest scale; `fit`
logs a warning and records it in meta["scale_check"] and meta["warnings"], and export refuses non-positive scales
(a head fitted before this parameterisation) and records tiny ones in the package's verification.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from pydantic import Field

from ltserve.errors import PackageError
from ltserve.heads.common import Val, head_extra
from ltserve.heads.head import CalibratedHead, raw_bias
from ltserve.heads.sgd import SgdFitter, SgdSettings, params as sgd_params

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

TINY_SCALE = 0.05
"""A scale f_j < TINY_SCALE * max_k f_k is "tiny": class j's logits are compressed 20x or more against the most
amplified class's, so its logit is nearly the constant 0 whatever the input: the class is then predicted when every
other logit is negative, whatever its own features say. Relative to the largest scale because a common factor on
all scales only changes the softmax temperature."""


class LwsSettings(SgdSettings):
    """`rebalance.lws`: the paper trains 5 epochs at lr 0.2 (weight decay acts on the log-scales, pulling f to 1)."""

    epochs: int = Field(5, ge=1)


def scaled_linear(weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """logits = exp(s) * (x W^T + b) with W (C, D), b (C,) frozen buffers and the log-scales s (C,), initialised to
    0 (f = 1), the only parameter; `scales` is f = exp(s)."""
    import torch
    from torch import nn

    class ScaledLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.as_tensor(np.asarray(weight, dtype=np.float32)))
            self.register_buffer("bias", torch.as_tensor(np.asarray(bias, dtype=np.float32)))
            self.log_scales = nn.Parameter(torch.zeros(self.weight.shape[0]))

        @property
        def scales(self) -> torch.Tensor:
            return torch.exp(self.log_scales)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scales * (x @ self.weight.T + self.bias)

    return ScaledLinear()


def scale_check(scales: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Which scales are non-positive (a head learnt before scales were kept positive) or tiny.

    Args:
        scales: f (C,).
        class_names: (C,) names for the messages (default: class indices only).

    Returns:
        {"tiny_threshold": TINY_SCALE, "relative_to": "max scale", "min_ratio": min f / max f (None when no f is
        positive), "non_positive": [class index], "tiny": [class index of 0 < f_j < TINY_SCALE * max f],
        "warnings": [message]} (JSON-able); "warnings" is empty for a healthy head.
    """
    f = np.asarray(scales, dtype=np.float64)
    top = float(f.max())
    non_positive = np.flatnonzero(f <= 0).tolist()
    tiny = np.flatnonzero((f > 0) & (f < TINY_SCALE * top)).tolist() if top > 0 else []
    warnings = []
    if non_positive:
        warnings.append("non-positive scales reverse the logits of " + _listing(f, class_names, non_positive))
    if tiny:
        warnings.append(f"scales below {TINY_SCALE:g} x the largest ({top:.3g}) make the logit nearly 0 whatever the "
                        f"input (the class's features no longer count) for " + _listing(f, class_names, tiny))
    return {"tiny_threshold": TINY_SCALE, "relative_to": "max scale",
            "min_ratio": float(f.min() / top) if top > 0 else None,
            "non_positive": non_positive, "tiny": tiny, "warnings": warnings}


def _listing(f: np.ndarray, names: Sequence[str] | None, idx: Sequence[int]) -> str:
    if names is None:
        return ", ".join(f"class {j} (f={f[j]:.3g})" for j in idx)
    return ", ".join(f"{names[j]!r} (class {j}, f={f[j]:.3g})" for j in idx)


class LWS(SgdFitter):
    """Per-class positive scales on the frozen joint classifier, trained with class-balanced sampling."""

    Settings = LwsSettings
    name = "lws"

    def fit(self, train_features: Any, train_labels: np.ndarray, base_head: CalibratedHead,
            val: Val) -> CalibratedHead:
        """Learn the scales and return the best epoch's head.

        Args:
            train_features: (N, D) cached training features, or a FeatureSource (`--no-cache`).
            train_labels: (N,) training labels.
            base_head: the joint head (W, b fixed; its temperature is ignored).
            val: (features (M, D), labels (M,)); picks the best epoch.

        Returns:
            a head named "lws" with W'_j = f_j W_j, b'_j = f_j b_j (f_j = exp(s_j) > 0), extras {"scales": f (C,)},
            meta {recipe..., best_epoch, selection_metric, epochs_curve, features, scale_check, warnings}.
        """
        if base_head.feature_transform != "none":
            raise ValueError(f"lws scales a plain linear head; base head {base_head.method!r} has feature transform "
                             f"{base_head.feature_transform!r} (use the joint head)")
        state, meta = self.fit_module(scaled_linear(base_head.weight, base_head.bias), train_features, train_labels,
                                      base_head, val)
        f = np.exp(state["log_scales"].cpu().numpy().astype(np.float64))
        log.info("lws: scales in [%.3f, %.3f]", f.min(), f.max())
        check = scale_check(f.astype(np.float32))  # the scales as saved in extras, so export finds the same
        for message in check["warnings"]:
            log.warning("lws: %s; the joint head scores those classes below 0 on their own training images (too "
                        "few of them?): compare the head with crt or tau_norm before using it", message)
        meta = {**meta, "scale_check": check, "warnings": list(check["warnings"])}
        return CalibratedHead(weight=f[:, None] * base_head.weight, bias=f * base_head.bias, method=self.name,
                              meta=meta, extras={"scales": f.astype(np.float32)})


def reference(head: CalibratedHead, joint: CalibratedHead, features: np.ndarray,
              class_counts: Sequence[int]) -> np.ndarray:
    """f_j (W0_j . x + b0_j) from the joint head and the learnt scales. (N, D) -> (N, C) float64."""
    f = head_extra(head, "scales").astype(np.float64)
    z = np.asarray(features, np.float64) @ joint.weight.astype(np.float64).T + raw_bias(joint)
    return f * z


def params(head: CalibratedHead) -> dict[str, Any]:
    """model.json's record of an lws head: best epoch, selection metric and the scales' min / mean / max."""
    out = sgd_params(head)
    if "scales" in head.extras:
        f = head.extras["scales"].astype(np.float64)
        out["scales"] = {"min": float(f.min()), "mean": float(f.mean()), "max": float(f.max())}
    return out


def check(head: CalibratedHead, class_names: Sequence[str]) -> list[str]:
    """Export's check of a head with lws scales (extras["scales"], f (C,)): the warnings about tiny ones.

    Raises:
        PackageError: a scale is <= 0 (it reverses the class's logits), naming the head, the classes and the fix.
    """
    if "scales" not in head.extras:
        return []
    found = scale_check(head.extras["scales"], class_names)
    if found["non_positive"]:
        raise PackageError(f"heads/{head.method}.safetensors: head {head.method!r} cannot be exported: "
                           f"{found['warnings'][0]}; re-fit it with `ltserve rebalance RUN --heads {head.method}` "
                           "(scales are now kept positive) or export another head")
    return list(found["warnings"])
