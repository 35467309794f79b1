"""How a model sees a clip, resolved once: frames and their sampling, test-time views, crop size (the
model's input), input normalisation and class list (``ClipGeometry``).

The dataset config and the model config both name some of these (``num_frames`` in each, ``crop_size``
beside ``backbone.img_size``); ``ClipGeometry.resolve`` is the one place they are reconciled and where a
mismatch is an error. Extraction, finetuning, predict and decoding (``video.decode_views``) take the
resolved object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from foundation.config import ConfigError
from stage1_extract.families import family_of
from stage1_extract.families.backbone import pixel_stats
from stage1_extract.videos.datasets import DatasetConfig


@dataclasses.dataclass(frozen=True)
class ClipGeometry:
    """The clips a model is fed: ``num_frames`` frames per temporal clip sampled by ``sampling`` (every
    ``frame_interval`` frames when dense), ``num_clips`` x ``num_crops`` test-time views, square crops of
    ``crop_size`` (the model's input), normalised by ``pixel_mean`` / ``pixel_std`` (None: the backbone's
    pretrained statistics), labelled by ``class_names`` (None: unknown here)."""

    num_frames: int
    crop_size: int
    sampling: Literal["uniform", "dense"] = "uniform"
    frame_interval: int = 16
    num_clips: int = 1
    num_crops: int = 1
    train_crop: Literal["random", "center"] = "random"
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for key in ("num_frames", "crop_size", "frame_interval", "num_clips"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"clip geometry {key}={value!r}: expected an integer >= 1")
        if self.num_crops not in (1, 3):
            raise ConfigError(f"clip geometry num_crops={self.num_crops!r}: expected 1 or 3")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        for key in ("pixel_mean", "pixel_std"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(float(v) for v in getattr(self, key)))

    @property
    def num_views(self) -> int:
        """Test-time views per clip: temporal clips x spatial crops."""
        return self.num_clips * self.num_crops

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    @classmethod
    def of_dataset(
        cls, data: DatasetConfig, crop_size: int | None = None, class_names: Sequence[str] | None = None
    ) -> ClipGeometry:
        """The sampling of a dataset config with ``crop_size`` (default: the config's own)."""
        crop = crop_size if crop_size is not None else data.crop_size
        if crop is None:
            raise ConfigError(f"dataset {data.name!r}: no crop_size (and no model input size to take)")
        sampling = {k: getattr(data, k) for k in ("sampling", "frame_interval", "num_clips", "num_crops")}
        return cls(
            num_frames=data.num_frames,
            crop_size=int(crop),
            train_crop=data.train_crop,
            class_names=tuple(class_names) if class_names is not None else None,
            **sampling,
        )

    @classmethod
    def resolve(
        cls,
        data: DatasetConfig,
        model: Any,
        source: str,
        class_names: Sequence[str] | None = None,
    ) -> ClipGeometry:
        """Reconciles a dataset config with a model config (one with ``num_frames`` and ``backbone.img_size``
        from ``source``): the frame counts must agree, and the crop is the model's input size (a dataset
        ``crop_size`` that differs from a set ``backbone.img_size`` is an error)."""
        what, frames, crop = f"dataset {data.name!r}", data.num_frames, data.crop_size
        if model.num_frames != frames:
            raise ConfigError(
                f"{source}: num_frames={model.num_frames} but {what} samples num_frames={frames}; make them "
                f"agree with num_frames={frames} (sets both), model.num_frames={frames} or "
                f"data.num_frames={model.num_frames}"
            )
        img = model.backbone.img_size
        if crop is not None and img is not None and crop != img:
            raise ConfigError(
                f"{source}: backbone.img_size={img} but {what} crops crop_size={crop}: the model takes one "
                f"input size (set data.crop_size={img} or model.backbone.img_size={crop})"
            )
        crop = crop if crop is not None else img
        if crop is None:
            raise ConfigError(f"{source}: set backbone.img_size (or the dataset's crop_size)")
        return cls.of_dataset(data, crop, class_names)

    def with_crop(self, data: DatasetConfig) -> DatasetConfig:
        """``data`` with this crop size (what a run or store records as its dataset config)."""
        return dataclasses.replace(data, crop_size=self.crop_size)

    def check_model(self, backbone: nn.Module, source: str) -> None:
        """The built backbone must take ``crop_size`` frames (timm asserts it mid-forward otherwise)."""
        if getattr(backbone, "dynamic_img_size", False):
            return
        patch_embed = getattr(backbone, "patch_embed", None)
        if patch_embed is not None and not getattr(patch_embed, "strict_img_size", True):
            return
        height, width = family_of(backbone).input_size(backbone)
        if (height, width) != (self.crop_size, self.crop_size):
            raise ConfigError(
                f"crop_size={self.crop_size}: the model of {source} takes {height}x{width} frames; "
                f"set crop_size={height} (or model.backbone.img_size={self.crop_size})"
            )

    def normalisation(
        self, backbone: nn.Module, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (3, 1, 1): this geometry's, else the backbone's pretrained statistics."""
        if self.pixel_mean is None or self.pixel_std is None:
            return pixel_stats(backbone, device)
        mean = torch.tensor(self.pixel_mean, device=device).view(3, 1, 1)
        return mean, torch.tensor(self.pixel_std, device=device).view(3, 1, 1)
