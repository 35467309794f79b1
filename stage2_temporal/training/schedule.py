"""The learning-rate schedule of both optimisers: linear warmup, then cosine decay to 0, set every step.

timm's ``CosineLRScheduler`` (``t_in_epochs=False``, ``warmup_prefix=True``) computes it. The recipe's
warmup is 1-based: step s < W (0-based) trains at ``(s + 1) / W`` of the base rate, so the last warmup
step already reaches the peak, and the cosine starts at step W, also at the peak. timm reaches the peak at
update ``warmup_t``; passing it ``s + 1`` during warmup and ``s`` after gives the recipe's schedule exactly.
The rate depends on the step alone, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.scheduler import CosineLRScheduler


class WarmupCosine:
    """Sets the optimiser's learning rates for optimiser step ``s`` (0-based): ``set_step(s)``.

    ``step()`` moves to the next step, like a torch scheduler called after each ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> None:
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.timm = CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - warmup_steps),
            lr_min=0.0,
            warmup_t=warmup_steps,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        self.current = 0
        self.set_step(0)

    def set_step(self, step: int) -> float:
        """Sets the rates of optimiser step ``step``; returns the first group's."""
        self.current = step
        self.timm.step_update(step + 1 if step < self.warmup_steps else step)
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        self.set_step(self.current + 1)


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The schedule as a factor of the base rate per step (for plots, curves and tests)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return WarmupCosine(probe, total_steps, warmup_steps).set_step
