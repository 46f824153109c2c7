"""Features: backbones that expose pooled features, extraction through a frozen backbone, and the run's cache.

    backbones.py  create_backbone (CIFAR ResNets, ResNet-10, timm by name), pretrained weights, Classifier,
                  load_run_backbone
    hub.py        model.pretrained by name: a local file, or hf-hub:ORG/NAME / a timm tag downloaded into
                  huggingface_hub's cache (safetensors only)
    extract.py    extract_features(backbone, imageset, spec) -> (N, D) float32; batch collation
    cache.py      cached_features(run, split) -> (features, labels), from cache/ when valid; the splits per process

Import the submodule you need: each of them imports torch.
"""
