"""Training augmentation of video clips with torchvision's v2 transforms: random resized crop, flip,
RandAugment, random erasing.

The transforms act on a clip as one ``tv_tensors.Video`` (T, 3, H, W), so every frame of a clip gets the
same crop, flip, RandAugment operations and erased box (a clip stays temporally coherent; the histogram
operations, equalize and auto-contrast, compute each frame's own histogram as torchvision does). The
randomness comes only from the ``torch.Generator`` passed in, which ``AugmentedClips`` seeds from
(seed, epoch, clip index): torchvision draws from torch's global generator, so each clip's transforms
run under ``torch.random.fork_rng`` seeded from it. The same clip in the same epoch is augmented the same
way whatever the process, worker or resume point, and the caller's global generator is left untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

MAGNITUDE_BINS = 31  # RandAugment's magnitude levels, 0..30 (Cubuk et al., 2020)


@dataclass
class AugmentConfig:
    """Training-time augmentation (evaluation never augments); ZeroI2V's recipe is paper 002, Table 12."""

    random_resized_crop: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # area fraction of the view
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect ratio w / h
    flip: float = 0.5  # probability of a horizontal flip (0 for classes whose meaning flips, e.g. left/right)
    randaugment_ops: int = 0  # n: operations per clip (0 = no RandAugment); paper 002 SSv2: 4
    randaugment_magnitude: int = 9  # m in [0, 30]; paper 002 SSv2: 7
    random_erasing: float = 0.0  # probability of erasing one box (paper 002 SSv2: 0.25)

    def validate(self) -> None:
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(
                f"key 'augment.crop_scale': expected [low, high] in (0, 1], got {self.crop_scale}"
            )
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"key 'augment.crop_ratio': expected [low, high] > 0, got {self.crop_ratio}")
        for key in ("flip", "random_erasing"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(
                    f"key 'augment.{key}': expected a probability in [0, 1], got {getattr(self, key)}"
                )
        if self.randaugment_ops < 0:
            raise ValueError(f"key 'augment.randaugment_ops': expected >= 0, got {self.randaugment_ops}")
        if not 0 <= self.randaugment_magnitude < MAGNITUDE_BINS:
            raise ValueError(
                f"key 'augment.randaugment_magnitude': expected 0..{MAGNITUDE_BINS - 1}, "
                f"got {self.randaugment_magnitude}"
            )

    @property
    def enabled(self) -> bool:
        return (
            self.random_resized_crop or self.flip > 0 or self.randaugment_ops > 0 or self.random_erasing > 0
        )


@contextlib.contextmanager
def drawing_from(generator: torch.Generator) -> Iterator[None]:
    """Runs torchvision's transforms (which draw from torch's global generator) on a copy of it seeded from
    ``generator``; the global generator is restored afterwards."""
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def clip_transform(cfg: AugmentConfig, size: tuple[int, int]) -> v2.Compose:
    """The configured transforms in order: crop (resized to ``size``, the clip's), flip, RandAugment, erasing.

    RandAugment uses torchvision's operation table with nearest interpolation and black fill; random erasing
    torchvision's box distribution (area 2-33%, aspect 0.3-3.3), filled with 0.
    """
    ops: list[v2.Transform] = []
    if cfg.random_resized_crop:
        ops.append(v2.RandomResizedCrop(size, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), antialias=True))
    if cfg.flip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.flip))
    if cfg.randaugment_ops:
        ops.append(v2.RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude, MAGNITUDE_BINS))
    if cfg.random_erasing > 0:
        ops.append(v2.RandomErasing(cfg.random_erasing, value=0))
    return v2.Compose(ops)


def resized_crop_box(
    height: int, width: int, scale: list[float], ratio: list[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's ``RandomResizedCrop`` box for an (height, width) frame."""
    crop = v2.RandomResizedCrop(size=(height, width), scale=tuple(scale), ratio=tuple(ratio))
    with drawing_from(generator):
        box = crop.make_params([torch.empty(3, height, width)])
    return box["top"], box["left"], box["height"], box["width"]


# Our names and magnitude units -> torchvision's RandAugment operation and its units (pixels for the
# translations, a fraction of 255 for the solarize threshold).
_RANDAUGMENT_OPS = {
    "identity": ("Identity", None),
    "shear_x": ("ShearX", None),
    "shear_y": ("ShearY", None),
    "translate_x": ("TranslateX", "width"),
    "translate_y": ("TranslateY", "height"),
    "rotate": ("Rotate", None),
    "brightness": ("Brightness", None),
    "color": ("Color", None),
    "contrast": ("Contrast", None),
    "sharpness": ("Sharpness", None),
    "posterize": ("Posterize", None),
    "solarize": ("Solarize", "255"),
    "auto_contrast": ("AutoContrast", None),
    "equalize": ("Equalize", None),
}
RANDAUGMENT_OPS = tuple(_RANDAUGMENT_OPS)


def apply_randaugment_op(video: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """One of RandAugment's operations, exactly as torchvision's ``RandAugment`` applies it to a clip.

    ``video``: float (T, 3, H, W) in [0, 255] (rounded to uint8 first, as the pipeline holds clips);
    ``magnitude``: signed, translations as a fraction of the frame, solarize as a threshold in [0, 255],
    rotation and shear as torchvision takes them. Returns float in [0, 255].
    """
    if name not in _RANDAUGMENT_OPS:
        raise ValueError(f"RandAugment operation {name!r}: expected one of {list(RANDAUGMENT_OPS)}")
    op, unit = _RANDAUGMENT_OPS[name]
    H, W = video.shape[-2:]
    pixels = {"width": W, "height": H}
    if unit in pixels:
        magnitude = float(round(magnitude * pixels[unit]))  # torchvision truncates to whole pixels
    elif unit == "255":
        magnitude = magnitude / 255.0
    clip = tv_tensors.Video(video.round().clamp(0, 255).to(torch.uint8))
    randaugment = v2.RandAugment(interpolation=InterpolationMode.NEAREST)
    # The method RandAugment.forward calls for each drawn operation (torchvision keeps it private).
    out = randaugment._apply_image_or_video_transform(
        clip, op, magnitude, interpolation=randaugment.interpolation, fill=randaugment._fill
    )
    return out.as_subclass(torch.Tensor).float()


def augment_clip(video: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augments uint8 views ``(V, T, 3, H, W)``, the same way for every frame; returns uint8 of that shape."""
    if not cfg.enabled:
        return video
    transform = clip_transform(cfg, tuple(video.shape[-2:]))
    clips = []
    for view in video:
        with drawing_from(generator):
            clips.append(transform(tv_tensors.Video(view)).as_subclass(torch.Tensor))
    return torch.stack(clips)


def derived_seed(*numbers: int) -> int:
    """A 63-bit seed that depends only on ``numbers`` (neighbouring tuples give unrelated seeds)."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation generator of clip ``index`` in ``epoch``: a function of (seed, epoch, index) only."""
    return torch.Generator().manual_seed(derived_seed(seed, epoch, index, 0x617567))


class AugmentedClips(Dataset):
    """A ``VideoClipDataset`` (training mode) whose decoded items are augmented per (seed, epoch, index)."""

    def __init__(self, clips: Any, cfg: AugmentConfig, seed: int = 0) -> None:
        self.clips = clips
        self.cfg = cfg
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch of both the clip sampling and the augmentation."""
        self.clips.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.clips[index]
        if item["video"] is not None:
            generator = item_generator(self.seed, self.clips.epoch, index)
            item["video"] = augment_clip(item["video"], self.cfg, generator)
        return item
