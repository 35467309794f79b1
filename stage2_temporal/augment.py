"""Training augmentation of video clips with plain torch ops: random resized crop, flip, RandAugment, erasing.

Every frame of a clip gets the same crop, flip and RandAugment operations (a clip stays temporally
coherent); random erasing picks one box for the whole clip. Randomness comes only from the
``torch.Generator`` passed in, which ``AugmentedClips`` seeds from (seed, epoch, clip index): the same
clip in the same epoch is augmented the same way whatever the process, worker or resume point.
RandAugment follows Cubuk et al. (2020) with torchvision's operation list and magnitude ranges
(31 magnitude bins); torchvision itself is not used (its compiled ops are broken on some machines).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

MAGNITUDE_BINS = 31


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


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    """A uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def resized_crop_box(
    height: int, width: int, scale: list[float], ratio: list[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect in ``ratio``.

    The algorithm of torchvision's ``RandomResizedCrop``: ten tries, then the largest centred crop whose
    aspect ratio is inside ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    video: torch.Tensor, scale: list[float], ratio: list[float], generator: torch.Generator
) -> torch.Tensor:
    """Crops one random box from every frame of float ``(T, 3, H, W)`` and resizes it back to (H, W)."""
    H, W = video.shape[-2:]
    top, left, h, w = resized_crop_box(H, W, scale, ratio, generator)
    crop = video[..., top : top + h, left : left + w]
    if (h, w) == (H, W):
        return crop
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False, antialias=True)


# --------------------------------------------------------------------------------------------- RandAugment
# Operations act on float (T, 3, H, W) in [0, 255] and return the same; ``m`` is the signed magnitude.


def _blend(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    """``b + factor (a - b)`` clamped to [0, 255] (PIL's ImageEnhance)."""
    return (b + factor * (a - b)).clamp_(0, 255)


def _grayscale(video: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (PIL's ``convert("L")``), (T, 1, H, W)."""
    r, g, b = video.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _affine(video: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """Applies a 2x3 inverse affine map in pixel coordinates about the image centre; outside = black."""
    H, W = video.shape[-2:]
    (a, b, c), (d, e, f) = matrix
    # Pixel coordinates -> normalised coordinates in [-1, 1] (align_corners=False).
    theta = torch.tensor(
        [[a, b * H / W, 2 * c / W], [d * W / H, e, 2 * f / H]], dtype=video.dtype, device=video.device
    )
    grid = F.affine_grid(theta.expand(video.shape[0], 2, 3), list(video.shape), align_corners=False)
    return F.grid_sample(video, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _shear_x(video: torch.Tensor, m: float) -> torch.Tensor:
    return _affine(video, [[1.0, m, 0.0], [0.0, 1.0, 0.0]])


def _shear_y(video: torch.Tensor, m: float) -> torch.Tensor:
    return _affine(video, [[1.0, 0.0, 0.0], [m, 1.0, 0.0]])


def _translate_x(video: torch.Tensor, m: float) -> torch.Tensor:
    return _affine(video, [[1.0, 0.0, -m * video.shape[-1]], [0.0, 1.0, 0.0]])


def _translate_y(video: torch.Tensor, m: float) -> torch.Tensor:
    return _affine(video, [[1.0, 0.0, 0.0], [0.0, 1.0, -m * video.shape[-2]]])


def _rotate(video: torch.Tensor, m: float) -> torch.Tensor:
    angle = math.radians(m)
    cos, sin = math.cos(angle), math.sin(angle)
    return _affine(video, [[cos, -sin, 0.0], [sin, cos, 0.0]])


def _brightness(video: torch.Tensor, m: float) -> torch.Tensor:
    return _blend(video, torch.zeros_like(video), 1.0 + m)


def _color(video: torch.Tensor, m: float) -> torch.Tensor:
    return _blend(video, _grayscale(video).expand_as(video), 1.0 + m)


def _contrast(video: torch.Tensor, m: float) -> torch.Tensor:
    mean = _grayscale(video).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(video, mean.expand_as(video), 1.0 + m)


def _sharpness(video: torch.Tensor, m: float) -> torch.Tensor:
    """Blends with PIL's SMOOTH filter (3x3, centre weight 5); border pixels keep their values."""
    kernel = torch.ones(3, 3, dtype=video.dtype, device=video.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
    smooth = video.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(video, kernel, groups=3)
    return _blend(video, smooth, 1.0 + m)


def _posterize(video: torch.Tensor, m: float) -> torch.Tensor:
    bits = int(m)
    mask = (0xFF << (8 - bits)) & 0xFF
    return (video.round().to(torch.uint8) & mask).to(video.dtype)


def _solarize(video: torch.Tensor, m: float) -> torch.Tensor:
    return torch.where(video >= m, 255.0 - video, video)


def _auto_contrast(video: torch.Tensor, m: float) -> torch.Tensor:
    """Stretches each channel to [0, 255] over the whole clip."""
    low = video.amin(dim=(0, 2, 3), keepdim=True)
    high = video.amax(dim=(0, 2, 3), keepdim=True)
    scale = torch.where(high > low, 255.0 / (high - low).clamp_min(1e-6), torch.ones_like(high))
    low = torch.where(high > low, low, torch.zeros_like(low))
    return ((video - low) * scale).clamp_(0, 255)


def _equalize(video: torch.Tensor, m: float) -> torch.Tensor:
    """Histogram equalisation per channel over the whole clip (PIL's ``ImageOps.equalize`` lookup table)."""
    pixels = video.round().clamp_(0, 255).to(torch.long)
    out = torch.empty_like(video)
    for c in range(video.shape[1]):
        values = pixels[:, c]
        hist = torch.bincount(values.flatten(), minlength=256)
        nonzero = hist[hist > 0]
        step = int((hist.sum() - nonzero[-1]) // 255)
        if step == 0:
            out[:, c] = video[:, c]
            continue
        lut = ((torch.cumsum(hist, 0) + step // 2) // step).clamp_(max=255)
        lut = torch.cat([lut.new_zeros(1), lut[:-1]])
        out[:, c] = lut[values].to(video.dtype)
    return out


def _identity(video: torch.Tensor, m: float) -> torch.Tensor:
    return video


def _op_table() -> dict[str, tuple[Callable, np.ndarray, bool]]:
    """name -> (operation, magnitudes per bin, signed): torchvision's RandAugment table."""
    bins = MAGNITUDE_BINS
    return {
        "identity": (_identity, np.zeros(bins), False),
        "shear_x": (_shear_x, np.linspace(0.0, 0.3, bins), True),
        "shear_y": (_shear_y, np.linspace(0.0, 0.3, bins), True),
        "translate_x": (_translate_x, np.linspace(0.0, 150.0 / 331.0, bins), True),
        "translate_y": (_translate_y, np.linspace(0.0, 150.0 / 331.0, bins), True),
        "rotate": (_rotate, np.linspace(0.0, 30.0, bins), True),
        "brightness": (_brightness, np.linspace(0.0, 0.9, bins), True),
        "color": (_color, np.linspace(0.0, 0.9, bins), True),
        "contrast": (_contrast, np.linspace(0.0, 0.9, bins), True),
        "sharpness": (_sharpness, np.linspace(0.0, 0.9, bins), True),
        "posterize": (_posterize, 8 - (np.arange(bins) / ((bins - 1) / 4)).round(), False),
        "solarize": (_solarize, np.linspace(255.0, 0.0, bins), False),
        "auto_contrast": (_auto_contrast, np.zeros(bins), False),
        "equalize": (_equalize, np.zeros(bins), False),
    }


RANDAUGMENT_OPS = tuple(_op_table())


def apply_randaugment_op(video: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """One RandAugment operation by name with a signed magnitude, on float ``(T, 3, H, W)`` in [0, 255]."""
    if name not in RANDAUGMENT_OPS:
        raise ValueError(f"RandAugment operation {name!r}: expected one of {list(RANDAUGMENT_OPS)}")
    return _op_table()[name][0](video, magnitude)


def randaugment(
    video: torch.Tensor, num_ops: int, magnitude: int, generator: torch.Generator
) -> torch.Tensor:
    """``num_ops`` operations drawn uniformly (with replacement), each with a random sign where signed."""
    table = _op_table()
    names = list(table)
    for _ in range(num_ops):
        op, magnitudes, signed = table[names[_randint(generator, len(names))]]
        m = float(magnitudes[magnitude])
        if signed and _randint(generator, 2):
            m = -m
        video = op(video, m)
    return video


def random_erase(video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Erases one random box (area 2-33%, aspect 0.3-3.3, as torchvision) in every frame, filled with 0."""
    H, W = video.shape[-2:]
    for _ in range(10):
        area = H * W * _uniform(generator, 0.02, 1 / 3)
        aspect = math.exp(_uniform(generator, math.log(0.3), math.log(1 / 0.3)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h < H and 0 < w < W:
            top, left = _randint(generator, H - h + 1), _randint(generator, W - w + 1)
            video = video.clone()
            video[..., top : top + h, left : left + w] = 0.0
            return video
    return video


def augment_clip(video: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augments uint8 views ``(V, T, 3, H, W)``, the same way for every frame; returns uint8 of that shape."""
    if not cfg.enabled:
        return video
    V, T = video.shape[:2]
    out = video.flatten(0, 1).float()
    clips = []
    for clip in out.unflatten(0, (V, T)):
        if cfg.random_resized_crop:
            clip = random_resized_crop(clip, cfg.crop_scale, cfg.crop_ratio, generator)
        if cfg.flip > 0 and _uniform(generator) < cfg.flip:
            clip = clip.flip(-1)
        if cfg.randaugment_ops:
            clip = randaugment(clip, cfg.randaugment_ops, cfg.randaugment_magnitude, generator)
        if cfg.random_erasing > 0 and _uniform(generator) < cfg.random_erasing:
            clip = random_erase(clip, generator)
        clips.append(clip)
    return torch.stack(clips).round_().clamp_(0, 255).to(torch.uint8)


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
