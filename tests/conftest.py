"""Shared test setup: torchvision fix before timm, one thread, deterministic torch; one real clip."""

import warnings

import numpy as np
import pytest
import torch

import stage1_extract  # noqa: F401  (must precede any timm import)
from stage1_extract.videos.synthetic import write_video

torch.set_num_threads(1)
torch.use_deterministic_algorithms(False)
warnings.filterwarnings("ignore", message=".*randomly initialised.*")


@pytest.fixture(scope="session")
def clip_bytes(tmp_path_factory) -> bytes:
    """One real 32x32, 8-frame mp4 written with PyAV; copied under every file name a tree needs."""
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames).read_bytes()
