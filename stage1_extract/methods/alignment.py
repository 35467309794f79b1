"""What the aligning encoders learn, measured against a known camera motion (METHOD.md s9).

For each AM-flow block with an aligner, over a batch of clips whose camera offsets are known (the
synthetic generator's ``MotionClip.camera``), ``measure_alignment`` reports:

- token distances (frame 1's in place of frame t's with ``aligner_reference: first``): the mean L2
  distance between frame t's tokens and frame t+1's, as the flow's q and k
  see them (the block's ``norm1``, patch tokens only), for frame t+1 as it is (``before``), as the aligner
  outputs it (``aligned``) and with the true camera shift undone in its pixels (``true_shift``: frame
  t+1 rolled back by ``camera[t+1] - camera[t]``, rounded to whole pixels, then run through the model);
- AM flow on the background over AM flow on the object (patches the object covers at least half of, in
  frame t or t+1), with the aligners bypassed and on: alignment should shrink it (the background's flow
  vanishes, the object's remains).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from stage1_extract.methods.amflow_model import AMFlowBlock, AMFlowExtractor


def aligner_blocks(model: AMFlowExtractor) -> list[tuple[str, AMFlowBlock]]:
    """(name, block) of the AM-flow blocks that have an aligning encoder, in depth order."""
    blocks = model.family.blocks(model.vit)
    found = [(f"block{i + 1}", blocks[i]) for i in model.flow_block_indices if blocks[i].aligner is not None]
    if not found:
        raise ValueError("the model has no aligning encoder (model.aligning_encoder: false)")
    return found


@contextlib.contextmanager
def aligners_bypassed(model: AMFlowExtractor) -> Iterator[None]:
    """Inside, every AM-flow block computes frame t+1's attention map from x_{t+1} itself (no aligner)."""
    blocks = [b for _, b in aligner_blocks(model)]
    saved = [b.aligner for b in blocks]
    for b in blocks:
        b.aligner = None
    try:
        yield
    finally:
        for b, a in zip(blocks, saved):
            b.aligner = a


def block_inputs(model: AMFlowExtractor, video: torch.Tensor) -> list[torch.Tensor]:
    """The tokens entering each aligner block, (B, T, N, D) each, for a normalised video (B, T, 3, H, W)."""
    B, T = video.shape[:2]
    captured: list[torch.Tensor] = []
    hooks = [
        b.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        for _, b in aligner_blocks(model)
    ]
    try:
        model.encode(video)
    finally:
        for h in hooks:
            h.remove()
    return [x.reshape(B, T, *x.shape[1:]) for x in captured]


def undo_camera(
    video: torch.Tensor, camera: torch.Tensor | np.ndarray, reference: str = "previous"
) -> torch.Tensor:
    """Pairs ``(frame t, frame t+1 seen with frame t's camera)``: (B, T-1, 2, 3, H, W); with
    ``reference="first"``, ``(frame 1, frame t+1 seen with frame 1's camera)``.

    Frame t+1 is rolled back by the camera's move ``camera[t+1] - camera[ref]`` (B, T, 2) pixels (y, x),
    rounded to whole pixels (the generator's scenes wrap around the frame edges; its textures are sampled
    between pixels, so a fractional move leaves a resampling difference).
    """
    camera = torch.as_tensor(np.asarray(camera), dtype=torch.float64)
    B, T = video.shape[:2]
    if camera.shape != (B, T, 2):
        raise ValueError(f"camera: expected (B, T, 2) = ({B}, {T}, 2) offsets, got {tuple(camera.shape)}")
    first = reference == "first"
    moves = torch.round(camera[:, 1:] - (camera[:, :1] if first else camera[:, :-1])).long()
    pairs = torch.empty(B, T - 1, 2, *video.shape[2:], dtype=video.dtype)
    for b in range(B):
        for t in range(T - 1):
            dy, dx = moves[b, t].tolist()
            pairs[b, t, 0] = video[b, 0 if first else t]
            pairs[b, t, 1] = torch.roll(video[b, t + 1], shifts=(-dy, -dx), dims=(-2, -1))
    return pairs


def _object_patches(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Object masks (B, T, H, W) -> per pair t, the patches the object covers half of in t or t+1."""
    B, T, H, W = mask.shape
    cover = mask.float().reshape(B * T, 1, H, W)
    cover = torch.nn.functional.adaptive_avg_pool2d(cover, grid).reshape(B, T, -1) >= 0.5
    return cover[:, :-1] | cover[:, 1:]  # (B, T-1, P)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm(dim=-1).mean())


@torch.no_grad()
def measure_alignment(
    model: AMFlowExtractor,
    video: torch.Tensor,
    camera: torch.Tensor | np.ndarray,
    object_mask: torch.Tensor | np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Per aligner block: token distances before/aligned/true_shift and, with ``object_mask``, the
    background-over-object AM-flow ratio with the aligners bypassed and on (see the module's doc).

    ``video`` is normalised (B, T, 3, H, W) at the model's input size; ``camera`` (B, T, 2) pixels.
    """
    was_training = model.training
    model.eval()
    try:
        B, T = video.shape[:2]
        prefix = model.num_prefix_tokens
        blocks = aligner_blocks(model)
        inputs = block_inputs(model, video)
        reference = blocks[0][1].aligner_reference
        pairs = undo_camera(video, camera, reference).flatten(0, 1)  # (B*(T-1), 2, 3, H, W)
        undone = block_inputs(model, pairs)
        flows = {}
        if object_mask is not None:
            with aligners_bypassed(model):
                flows["bypassed"] = model.extract(video).flow
            flows["aligned"] = model.extract(video).flow
            objects = _object_patches(torch.as_tensor(np.asarray(object_mask)), model.patch_grid)
        report: dict[str, dict[str, float]] = {}
        for k, ((name, block), x, u) in enumerate(zip(blocks, inputs, undone)):
            norm = block.norm1
            following = norm(x[:, 1:, prefix:])
            current = norm(x[:, :-1, prefix:] if reference == "previous" else x[:, :1, prefix:])
            aligned = norm(block.aligner(x, reference)[:, :, prefix:])
            true = norm(u[:, 1, prefix:]).reshape(B, T - 1, *following.shape[2:])
            row = {
                "before": _distance(following, current),
                "aligned": _distance(aligned, current),
                "true_shift": _distance(true, current),
            }
            if object_mask is not None:
                for mode, flow in flows.items():
                    per_patch = flow[:, k, :-1, :, prefix:].sum(dim=2)  # (B, T-1, P): the T-1 real pairs
                    background = per_patch[~objects].mean()
                    row[f"flow_background_over_object_{mode}"] = float(background / per_patch[objects].mean())
            report[name] = row
        return report
    finally:
        model.train(was_training)
