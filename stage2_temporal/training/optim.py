"""The optimiser of both trainings (stage-2 heads and end-to-end finetuning): AdamW with weight decay on
the weight matrices only, as timm trains ViTs.

No decay on biases and other 1-D parameters (norms, adapter scales), nor on what a module's
``no_weight_decay()`` names (timm's convention: position / time embeddings, class tokens, the grouped
norms' per-group gains); timm's ``param_groups_weight_decay`` forms the two groups.
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters every submodule's ``no_weight_decay()`` lists (timm only asks the
    top-level model; ours are spread over adapters, heads and encoders)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters: a group with ``weight_decay``, a group without."""
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
