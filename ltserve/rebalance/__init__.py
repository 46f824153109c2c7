"""Stage 2: re-balance the classifier on the frozen backbone's features (Kang et al., ICLR 2020).

`rebalance(run)` (`ltserve rebalance runs/NAME`) fits every requested head of the registry (`ltserve.heads.HEADS`:
crt, tau_norm, lws, ncm, la, tau_norm+la, lws+la, and any registered method) on the run's cached features and
writes `heads/<head>.safetensors` + `heads/<head>.json`; it never changes `run.json`, `backbone.safetensors` or
`heads/joint.*`. The methods themselves live in `ltserve.heads` (one file each: settings, fit, reference logits);
this package runs them:

    run.py        rebalance(): the heads asked for, this invocation's overrides, the stage over them
    stage.py      one invocation: features, base heads, target prior, calibration, val metrics, saving
    prior.py      the target prior: uniform, train, or a file of class weights
    augmented.py  `--no-cache`: augmented images through the frozen backbone, for the methods that train

Batch norm: the official cRT and LWS runs leave BN in train mode during stage 2, so their BN statistics drift and
each of their heads ends up with its own backbone. ltserve keeps the stage-1 backbone exactly (eval mode, BN frozen)
for every head, which is what lets stage 2 run on cached features and one exported backbone serve every head.
`--no-cache` still sends augmented images through that same frozen backbone every epoch (crt and lws only), the
official way of feeding stage 2, so the two can be compared (`benchmarks/stage2.py`).
"""

from ltserve.rebalance.run import apply_rebalance_overrides, rebalance, resolve_heads
from ltserve.rebalance.stage import build_method

__all__ = ["apply_rebalance_overrides", "build_method", "rebalance", "resolve_heads"]
