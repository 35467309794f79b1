"""Shared test setup: torchvision fix before timm, one thread, deterministic torch."""

import warnings

import torch

import stage1_extract  # noqa: F401  (must precede any timm import)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(False)
warnings.filterwarnings("ignore", message=".*randomly initialised.*")
