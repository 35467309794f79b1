"""The feature-extractor seam: what extraction, the store's layout and predict use of a feature model.

A feature type is one module of this package with one ``FeatureExtractor`` subclass, and its line in
``FEATURE_TYPES`` (``stage1_extract/features/__init__.py``); a model config selects it (see
``feature_type_name``). A subclass provides:

- ``config_class`` and ``build(cfg, checkpoint)``: the model of a config, with a checkpoint's weights;
  ``config``: that config;
- ``extract(video)``: normalised frames (B, T, 3, H, W) -> ``ClipFeatures`` (what the store caches);
- ``layout()``: the shapes of those features (``FeatureLayout``), which size the store's arrays;
- ``backbone``: the image backbone (its input size and normalisation decode the clips).

The base class owns nothing method-specific. Example, a new type ``mine`` (module ``features/mine.py``)::

    class MyFeatures(FeatureExtractor):
        name = "mine"
        config_class = MyConfig

        @classmethod
        def build(cls, cfg, checkpoint=None): ...
        config = property(lambda self: self.cfg)
        backbone = property(lambda self: self.vit)
        def extract(self, video): ...
        def layout(self): ...

and ``"mine": MyFeatures`` in ``FEATURE_TYPES``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from foundation.features import ClipFeatures
from store.layout import FlowBlock


@dataclass(frozen=True)
class FeatureLayout:
    """The shapes of one clip's features: adapter sequences (``adapter_names``, width ``embed_dim``), the
    last frame's pooled feature (``cls_dim``) and per flow block the geometry of its per-token maps."""

    adapter_names: list[str]
    embed_dim: int
    cls_dim: int
    flow_block_names: list[str]
    flow_geometry: list[FlowBlock]


class FeatureExtractor(nn.Module, metaclass=ABCMeta):
    """A video feature model stage 1 runs and caches (see the module docstring)."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    @classmethod
    @abstractmethod
    def build(cls, cfg: Any, checkpoint: str | None = None) -> FeatureExtractor:
        """The model of ``cfg`` in inference mode, with ``checkpoint``'s weights if given."""

    @property
    @abstractmethod
    def config(self) -> Any:
        """The resolved config the model was built from (recorded with its features)."""

    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The image backbone (a model of a registered family)."""

    @abstractmethod
    def extract(self, video: torch.Tensor) -> ClipFeatures:
        """Normalised frames (B, T, 3, H, W) -> the features the store caches."""

    @abstractmethod
    def layout(self) -> FeatureLayout:
        """The shapes of ``extract``'s features."""
