"""The backbone families amflow runs on: the registry (``FAMILIES``, one line per family).

What a family provides is ``base.BackboneFamily``; each family is one module of this package.
"""

from __future__ import annotations

from torch import nn

from stage1_extract.families.base import BackboneFamily
from stage1_extract.families.hiera import TimmHiera
from stage1_extract.families.swin import TimmSwin
from stage1_extract.families.vit import TimmViT

# The backbone families amflow runs on, tried in order.
FAMILIES: list[BackboneFamily] = [TimmViT, TimmSwin, TimmHiera]


def is_backbone(module: nn.Module) -> bool:
    """Whether ``module`` is a backbone model of a registered family (its weights are the frozen ones)."""
    return any(family.matches(module) for family in FAMILIES)


def family_of(model: nn.Module) -> BackboneFamily:
    """The family that provides ``model`` (an error naming the model's class when none does)."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    names = ", ".join(f.model_class.__name__ for f in FAMILIES)
    raise ValueError(f"backbone {type(model).__name__} is not supported: amflow runs on {names}")
