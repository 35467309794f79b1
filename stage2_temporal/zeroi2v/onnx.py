"""A merged ZeroI2V classifier as ONNX: plain timm backbone (STDHA) + head, any batch size, for runtimes
other than PyTorch.

Input ``video``: float32 ``(batch, T, 3, H, W)``, frames already scaled to [0, 1] and normalised with the
model's mean and std; output ``logits`` ``(batch, num_classes)``. The graph's metadata records the
normalisation, the frame count and the class names (``amflow merge ... --onnx model.onnx``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from foundation.atomic import atomic_path
from stage1_extract.families import family_of
from stage1_extract.families.backbone import pixel_stats
from stage2_temporal.zeroi2v.model import ZeroI2VModel

ONNX_OPSET = 17


def require_onnx() -> None:
    """Fails in one line when the ``onnx`` package (the ``onnx`` extra) is not installed."""
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ValueError("--onnx needs the onnx package: pip install 'amflow[onnx]'") from e


def export_onnx(
    model: ZeroI2VModel, path: str | Path, class_names: Sequence[str] | None = None, opset: int = ONNX_OPSET
) -> Path:
    """Writes ``model`` (merged, in eval mode) as an ONNX graph with a dynamic batch axis, atomically."""
    require_onnx()
    import onnx

    model = model.eval()
    size = family_of(model.vit).input_size(model.vit)
    example = torch.zeros(2, model.num_frames, 3, *size)
    out = Path(path)
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that hold for every batch
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=["video"],
                output_names=["logits"],
                dynamic_axes={"video": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        graph = onnx.load(str(tmp))
        mean, std = pixel_stats(model.vit)
        meta = {
            "amflow": "zeroi2v-merged",
            "num_frames": str(model.num_frames),
            "input": "video (batch, T, 3, H, W): RGB in [0, 1], minus mean, over std",
            "mean": json.dumps(mean.flatten().tolist()),
            "std": json.dumps(std.flatten().tolist()),
            "class_names": json.dumps(list(class_names) if class_names else None),
        }
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(tmp))
    return out
