"""METHOD.md s7's control as a feature type: the AM-flow model whose cached per-token maps are the
frame-to-frame difference of each flow block's normed token features (one value per token) instead of
its AM flow (``maps: feature_diff``); the comparisons the project prints run both through the same heads."""

from __future__ import annotations

from stage1_extract.families.base import BlockGeometry
from stage1_extract.features.am_flow import AMFlowFeatures


class FeatureDifferenceControl(AMFlowFeatures):
    """The AM-flow feature model caching token-feature differences (``am_flow.feature_difference``)."""

    name = "feature_diff"

    @classmethod
    def map_channels(cls, block: BlockGeometry) -> int:
        """One value per token: the mean absolute difference of its features between frames."""
        return 1
