"""Config sections shared by the AM-flow and ZeroI2V models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneConfig:
    """The frozen timm ViT: name, input size, local weights, extra ``timm.create_model`` arguments."""

    name: str = "vit_tiny_patch16_224"
    img_size: int | None = None
    weights: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # STDHA head -> frame offset (explicit list or multiset {offset: count}); None = plain attention.
    head_offsets: list[int] | dict[int, int] | None = None
