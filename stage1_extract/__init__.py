"""Stage 1: frozen timm ViT + AM-flow adapters / STDHA, video datasets and decoding, feature extraction."""

from stage1_extract.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
