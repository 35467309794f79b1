"""``amflow visualize`` on a generated mp4 of a square crossing a static background: the heatmaps sit
where the square moved, in pixel coordinates, and the PNG and GIF are real image files."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from amflow.commands import visualize as visualize_command
from stage1_extract.extraction.visualize import (
    decode_clip,
    flow_heatmaps,
    load_visualization_model,
    plot_flow,
    save_gif,
)
from stage1_extract.videos.synthetic import write_video

TINY = "configs/models/amflow_tiny.yaml"
SMALL = ["backbone.timm_kwargs.depth=2"]  # 64 px, patch 8: an 8x8 patch grid
PATCH, GRID, FRAMES = 8, 8, 6
ROW = 3  # the square's patch row; it moves right one patch per frame, from column 1


@pytest.fixture(scope="module")
def square_video(tmp_path_factory):
    """A white square on a static smooth background, one patch per frame to the right; patches it covers."""
    y, x = np.mgrid[0:64, 0:64]
    background = np.stack([40 + y, 40 + x, np.full_like(y, 90)], axis=-1).astype(np.uint8)
    frames = np.repeat(background[None], FRAMES, axis=0)
    for t in range(FRAMES):
        x0 = (1 + t) * PATCH
        frames[t, ROW * PATCH : (ROW + 1) * PATCH, x0 : x0 + PATCH] = 255
    path = write_video(tmp_path_factory.mktemp("square") / "square.mp4", frames, crf=10)
    crossed = {(ROW, 1 + t) for t in range(FRAMES)}
    return path, crossed


@pytest.fixture(scope="module")
def model():
    return load_visualization_model(TINY, num_frames=FRAMES, overrides=SMALL)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="amflow")
    visualize_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_heatmaps_sit_where_the_square_moves(square_video, model):
    path, crossed = square_video
    video = decode_clip(path, FRAMES, 64)
    assert video.shape == (FRAMES, 3, 64, 64) and video.dtype == torch.uint8
    maps = flow_heatmaps(model, video, blocks=[1, 2])
    assert maps.shape == (2, FRAMES, 64, 64) and maps.dtype == np.float32
    # Nearest upsampling: constant within each 8x8 patch.
    patches = maps.reshape(2, FRAMES, GRID, PATCH, GRID, PATCH)
    assert np.array_equal(patches, np.broadcast_to(patches[:, :, :, :1, :, :1], patches.shape))
    per_patch = patches[:, :, :, 0, :, 0].sum(axis=1)  # (blocks, 8, 8), summed over frames
    inside = np.zeros((GRID, GRID), dtype=bool)
    for r, c in crossed:
        inside[r, c] = True
    for b in range(2):
        assert per_patch[b][inside].mean() > 5 * per_patch[b][~inside].mean(), b
        top = np.argsort(per_patch[b].ravel())[::-1][: len(crossed)]
        assert {divmod(int(i), GRID) for i in top} == crossed, b
    # Against the model's own flow on the same normalised frames: block 2, heads summed, CLS dropped.
    mean = torch.tensor(model.vit.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(model.vit.pretrained_cfg["std"]).view(3, 1, 1)
    with torch.no_grad():
        flow = model.extract(((video.float() / 255 - mean) / std)[None]).flow[0, 1].sum(dim=1)[:, 1:]
    np.testing.assert_allclose(
        patches[1, :, :, 0, :, 0].reshape(FRAMES, -1), flow.numpy(), rtol=1e-5, atol=1e-6
    )
    assert np.array_equal(flow_heatmaps(model, video, blocks=[2]), maps[1:])


def test_png_and_gif_are_written_and_readable(square_video, model, tmp_path):
    path, _ = square_video
    video = decode_clip(path, FRAMES, 64)
    maps = flow_heatmaps(model, video, blocks=[1, 2])
    png = plot_flow(video, maps, ["block1", "block2"], tmp_path / "figs" / "flow.png", title="square")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
    gif = save_gif(video, maps, ["block1", "block2"], tmp_path / "flow.gif", fps=5)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.is_animated and im.n_frames == FRAMES
        assert im.size == (3 * 128, 128 + 14)  # frame + 2 blocks, 64 px panels zoomed x2, label strip
        assert im.info["duration"] == 200
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["flow.gif", "flow.png"]
    with pytest.raises(ValueError, match="one name per block"):
        plot_flow(video, maps, ["block1"], tmp_path / "bad.png")


def test_cli_writes_png_and_gif(square_video, tmp_path, capsys):
    path, _ = square_video
    out = tmp_path / "out.png"
    argv = ["visualize", str(path), "--config", TINY, "--frames", str(FRAMES), "--blocks", "1,2", "--gif"]
    assert _cli([*argv, "--out", str(out), "--set", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "block1" in printed and "block2" in printed and f"wrote {out.with_suffix('.gif')}" in printed
    for written, fmt in ((out, "PNG"), (out.with_suffix(".gif"), "GIF")):
        with Image.open(written) as im:
            assert im.format == fmt


def test_errors_name_the_file_or_argument(square_video, model, tmp_path):
    missing = tmp_path / "nope" / "missing.mp4"
    base = ["--config", TINY, "--out", str(tmp_path / "x.png"), "--set", *SMALL]
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        _cli(["visualize", str(missing), *base])
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        decode_clip(missing, FRAMES, 64)
    path, _ = square_video
    with pytest.raises(ValueError, match=r"blocks: \[3\].*\[1, 2\]"):
        _cli(["visualize", str(path), *base, "--blocks", "3"])
    with pytest.raises(ValueError, match="--blocks"):
        _cli(["visualize", str(path), *base, "--blocks", "one"])
    with pytest.raises(ValueError, match="--out"):
        _cli(["visualize", str(path), "--config", TINY, "--out", str(tmp_path / "x.gif")])
    with pytest.raises(ValueError, match="expects 64x64"):
        flow_heatmaps(model, torch.zeros(FRAMES, 3, 32, 32, dtype=torch.uint8))
    assert not list(tmp_path.glob("*.png"))


def test_aligned_view_draws_each_block_unaligned_and_aligned(square_video, tmp_path, capsys):
    path, _ = square_video
    out = tmp_path / "aligned.png"
    argv = ["visualize", str(path), "--config", TINY, "--frames", str(FRAMES), "--out", str(out), "--aligned"]
    assert _cli([*argv, "--set", *SMALL, "aligning_encoder=true", "aligner_heads=3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:6] in ("block1", "block2")]
    assert [r[:2] for r in rows] == [[b, v] for b in ("block1", "block2") for v in ("unaligned", "aligned")]
    assert rows[0][2:] == rows[1][2:]  # a fresh aligner is the identity: the same flow
    with Image.open(out) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="--aligned.*no aligning encoder"):
        _cli([*argv, "--overwrite", "--set", *SMALL])
