"""Config sections shared by the AM-flow and ZeroI2V models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneConfig:
    """The frozen timm backbone (ViT, Swin): name, input size, its weights, extra ``timm.create_model``
    arguments.

    Weights come from ``weights`` (a local file or transformers folder, any format
    ``stage1_extract.families.weight_formats`` reads) or, with ``pretrained: true``, from timm's pretrained
    tag in ``name`` (the Hugging Face hub, or its local cache offline); with neither, a random backbone.
    """

    name: str = "vit_tiny_patch16_224"
    img_size: int | None = None
    weights: str | None = None
    pretrained: bool = False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # STDHA head -> frame offset (explicit list or multiset {offset: count}) for every block; or a list of
    # those, one per stage (Swin); or the temporal fraction of each stage's heads (0.25: offsets -1, +1,
    # -2, +2, ... in turn); None = plain attention. ZeroI2V resolves it to explicit lists.
    head_offsets: list[int] | dict[int, int] | list[list[int] | dict[int, int]] | float | None = None

    def validate(self) -> None:
        if self.weights and self.pretrained:
            raise ValueError(
                f"keys 'backbone.weights' ({self.weights}) and 'backbone.pretrained': give one, not both"
            )
