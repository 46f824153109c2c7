"""Features: backbones that expose pooled features, extraction through a frozen backbone, and the run's cache.

    backbones.py  create_backbone (CIFAR ResNets, ResNet-10, timm by name), local weights, Classifier,
                  load_run_backbone
    extract.py    extract_features(backbone, imageset, spec) -> (N, D) float32; batch collation
    cache.py      cached_features(run, split) -> (features, labels), from cache/ when valid; the splits per process

Import the submodule you need: each of them imports torch.
"""
