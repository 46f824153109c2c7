"""Heads: the linear layer every method returns, the methods that make them, and the registry that names them.

    head.py       CalibratedHead: the value (weight, bias, transform, temperature), folding, target-prior shift
    files.py      heads/<name>.safetensors + .json
    registry.py   HEADS: name -> method, config section, base head, trains?, reference logits
    common.py     HeadFitter base, input checks, val scoring and sweeps
    calibrate.py  temperature scaling
    joint.py crt.py tau_norm.py lws.py ncm.py la.py   one file per method: settings, fit, reference
    sgd.py        the torch loop crt and lws train with (torch imported only when they fit)

A foundation: NumPy and pydantic at import; config, evaluation and export read the registry, and stage 2
(`ltserve.rebalance`) runs the methods on a run's cached features.
"""

from ltserve.heads.files import head_sha256, list_heads, load_head, save_head
from ltserve.heads.head import L2_EPS, PRIOR_KEY, CalibratedHead, apply_target_prior, raw_bias, strip_target_prior
from ltserve.heads.registry import HEADS, HeadMethod, Registry

__all__ = ["HEADS", "L2_EPS", "PRIOR_KEY", "CalibratedHead", "HeadMethod", "Registry", "apply_target_prior",
           "head_sha256", "list_heads", "load_head", "raw_bias", "save_head", "strip_target_prior"]
