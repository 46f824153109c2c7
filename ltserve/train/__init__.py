"""Stage 1: joint training of backbone + linear classifier on the long-tailed training set.

    train(cfg, out) -> RunInfo          the library call; `ltserve train` (ltserve.cli.train) wraps it
    load_data(cfg) -> Splits            the recipe's splits, remembered for the feature cache
    torchrun --nproc_per_node N -m ltserve.cli train CONFIG.yaml --out runs/NAME      # DDP (nccl on CUDA, gloo on CPU)

    stage1.py      `train`: the epochs, checkpoints, per-epoch val metrics and the end-of-training evaluation
    loop.py        process group, data loader, model, lr schedule, AMP, `train_one_epoch`
    val_metrics.py accuracy of the joint head on val after each epoch, and the run's metrics.csv
    checkpoint.py  resumable checkpoints (safetensors + JSON)
    run_files.py   backbone.safetensors, heads/joint.*, run.json
"""

from ltserve.train.stage1 import load_data, train

__all__ = ["load_data", "train"]
