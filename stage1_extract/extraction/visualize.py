"""AM-flow pictures: where a model's attention maps change from frame to frame, drawn over the frames.

``flow_heatmaps`` runs the model on one decoded clip and turns each chosen AM-flow block's flow
(METHOD.md section 1, eq. 4: ``N * |s_t - s_{t+1}|`` per head and token) into a map per pixel: summed
over heads, prefix tokens (CLS, registers) dropped, the patch grid upsampled to the frame with nearest
neighbours (one value per patch, nothing invented between patches). ``plot_flow`` draws a still figure
(the frames, then one row per block with its own colour bar), ``save_gif`` an animation (the frame and
each block's heatmap side by side, each block on its own scale, written in the panel's label). Both write
a temporary file and rename it, so a half-written picture is never left under the requested name.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from foundation.atomic import atomic_path
from stage1_extract.families.backbone import RANDOM_INIT_WARNING, normalise_video, pixel_stats
from stage1_extract.methods.amflow_model import AMFlowExtractor
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.video import decode_views

COLORMAP = "inferno"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def load_visualization_model(
    config: str | Path,
    checkpoint: str | None = None,
    *,
    num_frames: int | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device = "cpu",
) -> AMFlowExtractor:
    """The AM-flow model of ``config`` in inference mode, as ``amflow extract`` loads it.

    ``num_frames`` (default: the config's) sets the clip length the model is built for.
    """
    from stage1_extract.extraction.extract import load_extraction_model
    from stage1_extract.methods.models import load_feature_config

    cfg = load_feature_config(config, overrides)
    if num_frames is not None:
        if num_frames < 2:
            raise ValueError(
                f"num_frames: AM flow compares consecutive frames, so it needs >= 2, got {num_frames}"
            )
        cfg = dataclasses.replace(cfg, num_frames=num_frames)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)  # a backbone without weights
        return load_extraction_model(cfg, checkpoint, torch.device(device))


def frame_size(model: AMFlowExtractor) -> int:
    """The square input size the model's patch embedding expects (the crop size for decoding)."""
    height, width = model.family.input_size(model.vit)
    if height != width:
        raise ValueError(f"the model's input is {height}x{width}; visualisation decodes square centre crops")
    return height


def decode_clip(path: str | Path, num_frames: int, crop_size: int) -> torch.Tensor:
    """``num_frames`` uniformly sampled frames of a video (middle of each segment), centre-cropped, uint8
    ``(T, 3, crop, crop)``. Raises FileNotFoundError naming ``path`` when there is no such file."""
    return decode_views(path, ClipGeometry(num_frames=num_frames, crop_size=crop_size), train=False)[0]


def select_blocks(model: AMFlowExtractor, blocks: Sequence[int] | None) -> list[int]:
    """Positions in ``model.flow_block_names`` of the 1-based block numbers ``blocks`` (None = all)."""
    available = [i + 1 for i in model.flow_block_indices]
    if blocks is None:
        return list(range(len(available)))
    unknown = [b for b in blocks if b not in available]
    if unknown or not blocks:
        raise ValueError(f"blocks: {list(blocks)} are not all AM-flow blocks of this model; expected numbers "
                         f"from {available} (1-based, as the config's 'blocks' key)")  # fmt: skip
    return [available.index(b) for b in blocks]


def _check_video(video_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    video = torch.as_tensor(video_uint8)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video: expected uint8 frames (T, 3, H, W), got {video.dtype} {tuple(video.shape)}")
    return video


@torch.inference_mode()
def flow_heatmaps(
    model: AMFlowExtractor,
    video_uint8: torch.Tensor | np.ndarray,
    blocks: Sequence[int] | None = None,
    *,
    bypass_aligners: bool = False,
) -> np.ndarray:
    """AM flow per pixel, float32 ``(blocks, T, H, W)``: summed over heads, each block's token grid
    upsampled (nearest).

    ``video_uint8`` is one clip ``(T, 3, H, W)`` at the model's input size, normalised here with the
    backbone's mean and std as extraction does; ``blocks`` are 1-based block numbers (None = every
    AM-flow block of the model). ``bypass_aligners`` computes the flow as if the model had no aligning
    encoders (frame t+1's own attention map), for comparing with the aligned flow.
    """
    if bypass_aligners:
        from stage1_extract.methods.alignment import aligners_bypassed

        with aligners_bypassed(model):
            return flow_heatmaps(model, video_uint8, blocks)
    video = _check_video(video_uint8)
    positions = select_blocks(model, blocks)
    num_frames, _, height, width = video.shape
    size = frame_size(model)
    if (height, width) != (size, size):
        raise ValueError(f"video: frames are {height}x{width}, the model expects {size}x{size}")
    device = next(model.parameters()).device
    mean, std = pixel_stats(model.vit, device)
    x = normalise_video(video.to(device), mean, std)
    features = model.extract(x[None])
    maps = []
    for p in positions:  # each block on its own grid (hierarchical backbones: one per stage)
        geometry = model.flow_geometry[p]
        per_patch = features.block_flow(p)[0].float().sum(dim=1)[..., geometry.prefix_tokens :]  # (T, P)
        grid = per_patch.reshape(1, num_frames, *geometry.grid)
        maps.append(torch.nn.functional.interpolate(grid, size=(height, width), mode="nearest")[0])
    return torch.stack(maps).cpu().numpy()


def _frames_hwc(video_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
    return _check_video(video_uint8).permute(0, 2, 3, 1).cpu().numpy()


def _scales(heatmaps: np.ndarray, shared: int = 1) -> np.ndarray:
    """Each row's colour-scale maximum: its largest value over the clip (a tiny floor for static clips),
    taken over each group of ``shared`` consecutive rows (2: a block's unaligned and aligned rows)."""
    peaks = np.maximum(heatmaps.reshape(len(heatmaps), -1).max(axis=1), 1e-6)
    if shared < 1 or len(peaks) % shared:
        raise ValueError(f"shared: {len(peaks)} rows do not split into groups of {shared}")
    return np.repeat(peaks.reshape(-1, shared).max(axis=1), shared)


def overlay(frame: np.ndarray, heat01: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """A heatmap in [0, 1] ``(H, W)`` coloured with ``COLORMAP`` over the grey frame ``(H, W, 3)``, uint8."""
    import matplotlib

    grey = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    colour = matplotlib.colormaps[COLORMAP](np.clip(heat01, 0.0, 1.0))[..., :3] * 255.0
    mixed = (1.0 - alpha) * grey[..., None] + alpha * colour
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _check_shapes(frames: np.ndarray, heatmaps: np.ndarray, block_names: Sequence[str]) -> None:
    if heatmaps.ndim != 4 or heatmaps.shape[1:] != frames.shape[:3] or len(block_names) != len(heatmaps):
        raise ValueError(f"heatmaps {heatmaps.shape} and {len(block_names)} block names do not fit frames "
                         f"{frames.shape}: expected (blocks, T, H, W) with one name per block")  # fmt: skip


def plot_flow(
    video_uint8: torch.Tensor | np.ndarray,
    heatmaps: np.ndarray,
    block_names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
    quantity: str = "AM flow",
    shared_scale: int = 1,
) -> Path:
    """Still figure: the frames in a row, then per block its heatmap over each frame, a colour bar per row
    (one scale over each group of ``shared_scale`` consecutive rows)."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    frames = _frames_hwc(video_uint8)
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    _check_shapes(frames, heatmaps, block_names)
    path = Path(path)
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in ("png", "pdf", "svg", "jpg", "jpeg"):
        raise ValueError(f"{path}: the figure's file type comes from its suffix: .png, .pdf, .svg or .jpg")
    num_blocks, T = heatmaps.shape[:2]
    vmax = _scales(heatmaps, shared_scale)
    fig, axes = plt.subplots(
        1 + num_blocks,
        T,
        figsize=(1.5 * T + 1.4, 1.5 * (1 + num_blocks) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for t in range(T):
        axes[0, t].imshow(frames[t])
        axes[0, t].set_title(f"frame {t + 1}", fontsize=8)
        for b in range(num_blocks):
            axes[b + 1, t].imshow(overlay(frames[t], heatmaps[b, t] / vmax[b]))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=8)
    for b in range(num_blocks):
        axes[b + 1, 0].set_ylabel(block_names[b], fontsize=8)
        bar = fig.colorbar(
            ScalarMappable(Normalize(0.0, float(vmax[b])), COLORMAP),
            ax=list(axes[b + 1]),
            shrink=0.9,
            pad=0.01,
        )
        bar.ax.tick_params(labelsize=6)
    scope = "row" if shared_scale == 1 else f"{shared_scale} rows"
    heading = f"{quantity} per patch (sum over heads); colour scale per {scope}, 0 to their maximum"
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=9)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="jpeg" if suffix == "jpg" else suffix, dpi=110)
    finally:
        plt.close(fig)
    return path


def save_gif(
    video_uint8: torch.Tensor | np.ndarray,
    heatmaps: np.ndarray,
    block_names: Sequence[str],
    path: str | Path,
    *,
    fps: float = 4.0,
    min_panel: int = 128,
    shared_scale: int = 1,
) -> Path:
    """Animated GIF, one image per frame: the frame, then each block's heatmap over it, side by side.

    Each block keeps one colour scale over the whole clip (0 to its maximum, printed in its label; shared
    by each group of ``shared_scale`` consecutive rows); panels are enlarged with nearest neighbours to at
    least ``min_panel`` pixels.
    """
    from PIL import Image, ImageDraw

    frames = _frames_hwc(video_uint8)
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    _check_shapes(frames, heatmaps, block_names)
    if fps <= 0:
        raise ValueError(f"fps: expected a positive number, got {fps}")
    T, H, W = frames.shape[:3]
    vmax = _scales(heatmaps, shared_scale)
    zoom = max(1, math.ceil(min_panel / max(H, W)))
    header = 14
    labels = [f"{name} (max {v:.3g})" for name, v in zip(block_names, vmax)]
    images = []
    for t in range(T):
        panels = [frames[t]] + [overlay(frames[t], heatmaps[b, t] / vmax[b]) for b in range(len(heatmaps))]
        strip = Image.fromarray(np.concatenate(panels, axis=1))
        strip = strip.resize((strip.width * zoom, strip.height * zoom), Image.NEAREST)
        canvas = Image.new("RGB", (strip.width, strip.height + header), "white")
        canvas.paste(strip, (0, header))
        draw = ImageDraw.Draw(canvas)
        for k, label in enumerate([f"frame {t + 1}/{T}", *labels]):
            draw.text((k * W * zoom + 3, 1), label, fill="black")
        images.append(canvas.quantize(colors=256, dither=Image.Dither.NONE))  # one palette per frame
    path = Path(path)
    with atomic_path(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )
    return path
