"""Hiera with AM flow: timm's own forward, AM flow against explicit attention maps per mask unit, the
geometry per block, pooling blocks refused, finetuning checkpoints and the commands end to end."""

import numpy as np
import pytest
import timm
import torch
from pipeline import train_evaluate_predict
from safetensors.torch import save_file

from amflow.cli import main
from stage1_extract.extraction.extract import load_extraction_model
from stage1_extract.extraction.visualize import flow_heatmaps
from stage1_extract.families import family_of
from stage1_extract.families.backbone import normalise_video, pixel_stats
from stage1_extract.families.base import BlockGeometry
from stage1_extract.methods.checkpoint import load_trainable_checkpoint
from stage1_extract.methods.model_config import BackboneConfig
from stage1_extract.methods.models import load_feature_config
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import ClipRecord
from stage1_extract.videos.synthetic import make_folder_dataset
from stage1_extract.videos.video import VideoClipDataset
from stage2_temporal.finetuning.finetune import finetune
from stage2_temporal.finetuning.models import AMFlowModelConfig, build_amflow, build_model
from stage2_temporal.finetuning.plan import plan_finetune
from stage2_temporal.heads import LSTMHeadsConfig
from store.feature_store import FeatureStore

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

# hiera_tiny_224 shrunk: 32 px -> 8x8 tokens; stage 1 (blocks 1-2) attends inside 4x4 mask units of 2x2
# tokens (timm's mask units are q_stride ** (stages - 1)), block 3 pools to 4x4 tokens (2 heads, width 32),
# block 4 attends globally.
TINY = {
    "embed_dim": 16,
    "stages": [2, 2],
    "q_pool": 1,
    "mask_unit_size": [2, 2],
    "mask_unit_attn": [True, False],
}
HIERA_CONFIG = "configs/models/amflow_hiera_tiny.yaml"


def tiny_cfg(timm_kwargs=TINY, **kw) -> AMFlowModelConfig:
    kw.setdefault("backbone", BackboneConfig(name="hiera_tiny_224", img_size=32, timm_kwargs=timm_kwargs))
    kw.setdefault("heads", LSTMHeadsConfig(hidden=16, layers=1))
    return AMFlowModelConfig(num_frames=4, num_classes=3, **kw)


def plain_timm(model) -> torch.nn.Module:
    ref = timm.create_model("hiera_tiny_224", img_size=32, num_classes=0, **TINY).eval()
    ref.load_state_dict({k: v for k, v in model.vit.state_dict().items() if "adapter" not in k})
    return ref


@pytest.mark.parametrize("aggregation", ["sum_softmax", "softmax_sum"])
def test_fresh_adapters_equal_timm_forward(aggregation):
    model = build_amflow(tiny_cfg(aggregation=aggregation)).eval()
    ref = plain_timm(model)
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens, feats = model.encode(video)
        expected = ref.forward_features(video.flatten(0, 1))
        pooled = ref(video.flatten(0, 1)).reshape(2, 4, -1)  # timm's head: token mean, then its norm
    assert model.flow_block_names == ["block1", "block2", "block4"]  # block 3 pools
    # sum_softmax runs timm's own kernels: bit-identical; softmax_sum reuses its explicit probabilities
    tol = 0.0 if aggregation == "sum_softmax" else 1e-5
    assert (tokens - expected).abs().max().item() <= tol
    assert (feats.cls - pooled[:, -1]).abs().max().item() <= tol
    assert feats.embeddings.shape == (2, 6, 4, 32)  # r = the backbone's output width by default


def explicit_flow(q: torch.Tensor, k: torch.Tensor, window: tuple[int, int] | None, T: int) -> torch.Tensor:
    """AM flow from explicit N x N attention logits inside each spatial window of the row-major grid.

    q, k: (B*T, H, W, h, d) on the grid -> (B, T, h, H*W), eq. 1-4 with a mean over each window's queries.
    """
    BT, H, W, h, d = q.shape
    wh, ww = window or (H, W)

    def windows(x):  # (BT, H, W, h, d) -> (BT, windows, n, h, d)
        x = x.reshape(BT, H // wh, wh, W // ww, ww, h, d).permute(0, 1, 3, 2, 4, 5, 6)
        return x.reshape(BT, -1, wh * ww, h, d)

    logits = torch.einsum("bwihd,bwjhd->bwhij", windows(q), windows(k)) / d**0.5  # X_A per window
    s = logits.mean(dim=-2).softmax(dim=-1).reshape(-1, T, *logits.shape[1:4])  # (B, T, windows, h, n)
    flow = wh * ww * (s[:, :-1] - s[:, 1:]).abs()
    flow = torch.cat([flow, flow[:, -1:]], dim=1)
    flow = flow.reshape(-1, T, H // wh, W // ww, h, wh, ww).permute(0, 1, 4, 2, 5, 3, 6)
    return flow.reshape(-1, T, h, H * W)


def test_am_flow_identity_holds_in_mask_unit_and_global_blocks():
    model = build_amflow(tiny_cfg()).eval()
    ref = plain_timm(model)
    inputs = {}
    for i, block in enumerate(ref.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        feats = model.extract(video)
        ref.forward_features(video.flatten(0, 1))
        for position, (i, geometry) in enumerate(zip(model.flow_block_indices, model.flow_geometry)):
            block = ref.blocks[i]
            h = block.attn.heads
            q, k, _ = block.attn.qkv(block.norm1(inputs[i])).chunk(3, dim=-1)  # per token: any order
            grid_q, grid_k = (ref.reroll(t, i).unflatten(-1, (h, -1)) for t in (q, k))  # timm's reroll
            expected = explicit_flow(grid_q, grid_k, geometry.window, 4)
            assert expected.abs().max() > 0
            torch.testing.assert_close(feats.block_flow(position), expected, rtol=1e-4, atol=1e-6)
    assert [g.window for g in model.flow_geometry] == [(2, 2), (2, 2), None]


def test_block_geometry_per_block():
    model = build_amflow(tiny_cfg()).eval()
    geometry = family_of(model.vit).block_geometry(model.vit)
    assert geometry == [
        BlockGeometry(grid=(8, 8), heads=1, width=16, window=(2, 2)),
        BlockGeometry(grid=(8, 8), heads=1, width=16, window=(2, 2)),
        BlockGeometry(grid=(8, 8), heads=2, width=32, window=(2, 2), pools=True),
        BlockGeometry(grid=(4, 4), heads=2, width=32),
    ]
    # against the tensors timm's forward passes: tokens in, width out
    ref = plain_timm(model)
    seen = []
    for block in ref.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], out.shape[-1])))
    with torch.no_grad():
        ref.forward_features(torch.randn(1, 3, 32, 32))
    assert seen == [(g.tokens, g.width) for g in geometry]


def test_weights_of_timm_and_of_the_hiera_release_load(tmp_path):
    ref = timm.create_model("hiera_tiny_224", img_size=32, num_classes=0, **TINY)
    save_file(ref.state_dict(), tmp_path / "timm.safetensors")
    # the hiera-transformer release: a model_state wrapper, the final norm as "norm.", the classifier
    release = {k.replace("head.norm.", "norm."): v for k, v in ref.state_dict().items()}
    release |= {"head.projection.weight": torch.zeros(5, 32), "head.projection.bias": torch.zeros(5)}
    torch.save({"model_state": release}, tmp_path / "release.pth")
    for name in ("timm.safetensors", "release.pth"):
        cfg = tiny_cfg(backbone=BackboneConfig("hiera_tiny_224", 32, str(tmp_path / name), timm_kwargs=TINY))
        loaded = build_amflow(cfg).vit.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items()), name


def test_am_flow_on_a_pooling_block_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"block 3 of hiera_tiny_224 .*pools.*\[1, 2, 4\]"):
        build_amflow(tiny_cfg(blocks=[1, 3]))
    with pytest.raises(ValueError, match="pooling: 'cls'"):
        build_amflow(tiny_cfg(pooling="cls"))
    with pytest.raises(ValueError, match=r"aligner_heads=12 must divide .* \[16, 32\]"):
        build_amflow(tiny_cfg(aligning_encoder=True))
    stdha = BackboneConfig("hiera_tiny_224", 32, timm_kwargs=TINY, head_offsets=[0])
    with pytest.raises(ValueError, match=r"head_offsets: .* one head count .* \[1, 2\]"):
        build_amflow(tiny_cfg(backbone=stdha))
    # timm groups unrolled tokens into windows that are mask units only for q_stride ** (stages - 1)
    with pytest.raises(ValueError, match="mask_unit_size"):
        build_amflow(tiny_cfg({**TINY, "mask_unit_size": [4, 4]}))


def test_gradients_reach_every_adapter_and_aligner_and_no_frozen_weight():
    model = build_amflow(tiny_cfg(aligning_encoder=True, aligner_heads=4, pooling="flow"))
    # non-zero W_up and aligner output layers (zero at init): gradients also cross adapters and aligners
    for name, p in model.named_parameters():
        if ".up." in name or any(k in name for k in ("out_proj", "linear2")):
            torch.nn.init.normal_(p, std=0.02)
    logits = model(torch.randn(2, 4, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == any(m in name for m in ("adapter", "aligner", "classifier.")), name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name


def test_flow_sits_on_the_moving_square_in_every_block():
    model = build_amflow(tiny_cfg(blocks=[1, 4])).eval()
    video = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    for t in range(4):  # an 8-pixel square moving right along row 1 of block 4's 4x4 grid
        video[t, :, 8:16, 4 * t + 4 : 4 * t + 12] = 255
    heat = flow_heatmaps(model, video)  # (blocks, T, H, W), each block's grid on the frame
    assert heat.shape == (2, 4, 32, 32)
    path = np.zeros((32, 32), dtype=bool)
    path[8:16, 4:24] = True
    for block in heat.sum(axis=1):  # over frames
        assert path[np.unravel_index(block.argmax(), block.shape)]
        assert block[path].mean() > 2 * block[~path].mean()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hiera_videos")
    make_folder_dataset(root, ["left", "right", "up"], {"train": 2, "val": 1}, 32, 8, seed=0)
    return root


SMALL = ["model.backbone.img_size=32", "model.bottleneck=16", "num_frames=4"]


def test_extract_train_evaluate_predict_end_to_end(videos, tmp_path, capsys):
    store, run = tmp_path / "train.zarr", tmp_path / "run"
    args = [
        "extract",
        "--dataset",
        "folder",
        "--root",
        str(videos),
        "--split",
        "train",
        "--config",
        HIERA_CONFIG,
    ]
    # AM-flow blocks of both stages: maps of different heads and grids, each kept on its own shape
    assert main([*args, "--out", str(store), "--flow", "--decode-workers", "0", *SMALL]) == 0
    train_evaluate_predict(
        store,
        run,
        videos,
        ["heads.hidden=16", "heads.flow_maps=true", "heads.flow_grid=2", "epochs=2"],
        capsys,
    )


def test_store_of_one_stage_flow_blocks_holds_what_the_model_and_timm_compute(videos, tmp_path):
    out = tmp_path / "flow.zarr"
    args = [
        "extract",
        "--dataset",
        "folder",
        "--root",
        str(videos),
        "--split",
        "val",
        "--config",
        HIERA_CONFIG,
    ]
    assert (
        main([*args, "--out", str(out), "--flow", "--decode-workers", "0", *SMALL, "model.blocks=[5,6]"]) == 0
    )
    store = FeatureStore.open(out)
    assert [(b.grid, b.prefix_tokens, b.heads) for b in store.layout.flow_blocks] == [((2, 2), 0, 4)] * 2
    cfg = load_feature_config(
        HIERA_CONFIG, ["backbone.img_size=32", "bottleneck=16", "num_frames=4", "blocks=[5,6]"]
    )
    model = load_extraction_model(cfg, None, torch.device("cpu"))
    geometry = ClipGeometry(num_frames=4, crop_size=32)
    item = VideoClipDataset([ClipRecord("val/up/up_0000.mp4", 2)], videos, geometry)[0]
    mean, std = pixel_stats(model.vit)
    video = normalise_video(item["video"], mean, std)
    with torch.no_grad():
        feats = model.extract(video)
        ref = timm.create_model("hiera_tiny_224", img_size=32, num_classes=0, embed_dim=32).eval()
        ref.load_state_dict({k: v for k, v in model.vit.state_dict().items() if "adapter" not in k})
        timm_pooled = ref(video[0, -1:])  # timm's own Hiera forward of the last frame, no classifier
    clip = store.read_clip(int(store.index_of("val/up/up_0000.mp4")))
    np.testing.assert_allclose(clip["cls"][0], timm_pooled[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(clip["embeddings"][:, 0], feats.embeddings[0].numpy(), rtol=2e-3, atol=2e-3)
    assert clip["flow"].shape[0] == 2 and clip["flow"].shape[-2:] == (4, 4)  # blocks; heads, tokens
    np.testing.assert_allclose(clip["flow"][:, 0], feats.flow[0].numpy(), rtol=2e-3, atol=2e-3)


def test_finetune_saves_only_trainable_weights(videos, tmp_path):
    plan = plan_finetune(
        "folder",
        videos,
        HIERA_CONFIG,
        recipe="configs/finetune/tiny.yaml",
        overrides=[*SMALL, "model.num_classes=3", "model.heads.hidden=16", "epochs=1"],
    )
    finetune(plan, tmp_path, progress=False)
    state, cfg = load_trainable_checkpoint(tmp_path / "best.safetensors")
    model = build_model(plan.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert any(".adapter_attn." in k for k in state) and not any(
        k.startswith("vit.blocks.0.attn.") for k in state
    )


def test_flow_map_heads_read_blocks_of_different_shapes():
    # blocks 1-2 (stage 1: 1 head, 8x8 grid) and 4 (stage 2: 2 heads, 4x4 grid) feed one classifier
    model = build_amflow(tiny_cfg(heads=LSTMHeadsConfig(hidden=16, layers=1, flow_maps=True, flow_grid=2)))
    feats = model.extract(torch.randn(2, 4, 3, 32, 32))
    assert [tuple(f.shape[2:]) for f in feats.flow] == [(1, 64), (1, 64), (2, 16)]
    logits = model.classifier(feats)
    assert logits.shape == (2, model.cfg.num_classes) and torch.isfinite(logits).all()
