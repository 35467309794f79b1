"""Swin as a backbone family with ZeroI2V (METHOD.md section 8): timm's own forward at initialisation,
STDHA inside window attention against a loop over frames and windows, the exact merge, weights in timm's
and Microsoft's layouts, per-block geometry, the paper's Swin-B configuration, and finetune -> merge ->
predict on generated videos, and its features extracted -> heads trained -> evaluated -> predicted."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import timm
import torch
from pipeline import train_evaluate_predict
from safetensors.torch import save_file

from amflow.cli import main
from stage1_extract.families import family_of
from stage1_extract.families.backbone import create_backbone
from stage1_extract.families.base import BlockGeometry
from stage1_extract.families.swin import SwinSTDHAttention
from stage1_extract.features import build_feature_extractor
from stage1_extract.methods.checkpoint import load_trainable_checkpoint
from stage1_extract.methods.linear_adapters import linear_adapter_modules, merge_linear_adapters
from stage1_extract.methods.models import load_feature_config
from stage1_extract.methods.stdha import stage_head_offsets, stdha_modules
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.finetuning.finetune import finetune
from stage2_temporal.finetuning.models import (
    build_model,
    build_model_on_meta,
    load_model_config,
    parameter_report,
)
from stage2_temporal.finetuning.plan import plan_finetune
from stage2_temporal.zeroi2v.model import build_zeroi2v, save_merged
from store.feature_store import FeatureStore

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

TINY = "configs/models/zeroi2v_swin_tiny.yaml"
SMALL = ["backbone.img_size=32"]  # 8x8 tokens: stage 1 has 4 windows of 4x4, stage 2 one window
ALL_SPATIAL = "backbone.head_offsets=[{0: 4}, {0: 8}]"


def tiny_model(*overrides: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(load_model_config(TINY, [*SMALL, *overrides])).eval()


def timm_swin(model) -> torch.nn.Module:
    """timm's own Swin of ``model``'s config holding ``model``'s backbone weights (adapters at init)."""
    cfg = model.config.backbone
    plain = timm.create_model(cfg.name, num_classes=0, img_size=cfg.img_size, **cfg.timm_kwargs)
    state = {k: v for k, v in model.vit.state_dict().items() if ".adapter." not in k}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


@pytest.mark.parametrize("fused", [False, True])
def test_fresh_model_is_timms_swin_exactly(fused):
    """Adapters at initialisation, zero temporal embedding, STDHA with every head spatial: 0 difference."""
    model = tiny_model(ALL_SPATIAL)
    assert len(stdha_modules(model.vit)) == 4 and len(linear_adapter_modules(model.vit)) == 16
    plain = timm_swin(model)
    for m in [*model.vit.modules(), *plain.modules()]:
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.frame_features(video)
        theirs = plain.forward_head(plain.forward_features(video.flatten(0, 1)), pre_logits=True)
    assert ours.shape == (2, 4, 96)
    assert torch.equal(ours.flatten(0, 1), theirs)


def reference_window_stdha(attn, x, mask, num_frames, windows, offsets):
    """Swin window attention written out: per clip, frame, window and head, temporal heads use K/V of the
    same window in frame t + Δt (their own at the clip's edges); relative position bias and mask added."""
    BTW, N, C = x.shape
    h = attn.num_heads
    d = attn.qkv.out_features // (3 * h)
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(-1, num_frames, windows, N, 3, h, d)
    table = attn.relative_position_bias_table
    bias = table[attn.relative_position_index.view(-1)].view(N, N, h)
    out = torch.zeros(qkv.shape[0], num_frames, windows, N, h, d)
    for b in range(qkv.shape[0]):
        for t in range(num_frames):
            for w in range(windows):
                for j in range(h):
                    src = t + offsets[j] if 0 <= t + offsets[j] < num_frames else t
                    q, k, v = qkv[b, t, w, :, 0, j], qkv[b, src, w, :, 1, j], qkv[b, src, w, :, 2, j]
                    logits = q @ k.T * d**-0.5 + bias[:, :, j]
                    if mask is not None:
                        logits = logits + mask[w]
                    out[b, t, w, :, j] = logits.softmax(-1) @ v
    return out.reshape(BTW, N, h * d) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("fused", [False, True])
def test_stdha_in_shifted_window_attention_matches_a_loop_over_frames_and_windows(fused):
    swin = create_backbone(
        "swin_tiny_patch4_window7_224", 32, embed_dim=24, depths=(2,), num_heads=(4,), window_size=4
    ).eval()
    block = family_of(swin).blocks(swin)[1]  # shifted windows: its mask is not None
    assert block.attn_mask is not None and block.attn_mask.shape[0] == 4
    offsets, T, W = [-1, 1, -2, 0], 3, 4
    stdha = SwinSTDHAttention.from_block(block, T, offsets)
    assert stdha.windows == W
    assert stdha.relative_position_bias_table is block.attn.relative_position_bias_table
    stdha.fused_attn = fused
    x = torch.randn(2 * T * W, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = stdha(x, block.attn_mask)
        expected = reference_window_stdha(block.attn, x, block.attn_mask, T, W, offsets)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_temporal_head_reads_the_same_window_of_the_next_frame():
    """A change in frame 1 reaches frame 0 through a +1 head only inside the changed token's window."""
    model = tiny_model("backbone.head_offsets=[[1, 0, 0, 0], {0: 8}]")
    block = family_of(model.vit).blocks(model.vit)[0]  # stage 1, unshifted 4x4 windows on 8x8 tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 8, 48, generator=g)  # one 4-frame clip
    changed = x.clone()
    changed[1, 5, 2] += torch.randn(48, generator=g)  # frame 1, token (5, 2): window (1, 0)
    with torch.no_grad():
        diff = (block(changed) - block(x)).abs().amax(-1)
    moved = diff[0] > 1e-4
    assert moved[4:, :4].all() and moved.sum() == 16  # every token of window (1, 0) in frame 0, no other
    assert diff[0][~moved].max() == 0
    assert diff[2:].max() == 0  # frames 2 and 3 read frames 3 and 3, not frame 1


def test_default_fraction_gives_the_papers_swin_b_counts():
    """1/4 of each stage's heads temporal, offsets -1, +1, -2, +2 in turn (paper 002, Table 11b)."""
    got = stage_head_offsets(0.25, [4, 8, 16, 32])
    assert got[0] == [-1, 0, 0, 0]
    assert got[1] == [-1, 1] + [0] * 6
    assert got[2] == [-1, 1, -2, 2] + [0] * 12
    assert got[3] == [-1, -1, 1, 1, -2, -2, 2, 2] + [0] * 24
    with pytest.raises(ValueError, match="stage 2 \\(8 heads\\)"):
        stage_head_offsets({-1: 1, 0: 3}, [4, 8])
    with pytest.raises(ValueError, match="2 per-stage entries for a backbone with 4 stages"):
        stage_head_offsets([{0: 4}, {0: 8}], [4, 8, 16, 32])


def test_fraction_reaching_outside_the_clip_is_an_error():
    with pytest.raises(ValueError, match=r"resolves to offsets \[-2, 2\], outside every 2-frame clip"):
        tiny_model("backbone.head_offsets=0.5", "num_frames=2")


def test_merged_equals_unmerged():
    model = tiny_model()
    assert model.config.backbone.head_offsets == [[-1, 0, 0, 0], [-1, 1, 0, 0, 0, 0, 0, 0]]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in linear_adapter_modules(model.vit):
            for p in m.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        model.head.time_embed.copy_(torch.randn(model.head.time_embed.shape, generator=g))
    video = torch.randn(2, 4, 3, 32, 32, generator=g)
    with torch.no_grad():
        unmerged = model(video)
        merge_linear_adapters(model.vit)
        merged = model(video)
    assert not linear_adapter_modules(model.vit)
    assert (merged - unmerged).norm() / unmerged.norm() <= 1e-5
    assert set(model.vit.state_dict()) == set(timm_swin(tiny_model()).state_dict())


def test_weights_in_timm_and_microsofts_layout_load(tmp_path):
    kwargs = dict(embed_dim=24, depths=(1, 1), num_heads=(2, 4), window_size=4)
    source = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, num_classes=3, **kwargs)
    state = source.state_dict()
    # Microsoft's release: the patch merging belongs to the stage before it, the classifier is 'head'.
    original = {
        k.replace("layers.1.downsample", "layers.0.downsample").replace("head.fc.", "head."): v
        for k, v in state.items()
    }
    x = torch.randn(2, 3, 32, 32)
    expected = source.eval().forward_head(source.forward_features(x), pre_logits=True)
    for name, weights in (("timm", state), ("original", original)):
        save_file(weights, str(tmp_path / f"{name}.safetensors"))
        path = tmp_path / f"{name}.safetensors"
        model = create_backbone("swin_tiny_patch4_window7_224", 32, path, **kwargs)
        out = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(out, expected), name


def test_block_geometry_per_stage():
    model = tiny_model()
    family = family_of(model.vit)
    assert family.stages(model.vit) == [[0, 1], [2, 3]]
    assert family.block_geometry(model.vit) == [
        *[BlockGeometry((8, 8), 4, 48, window=(4, 4))] * 2,
        *[BlockGeometry((4, 4), 8, 96, window=(4, 4))] * 2,
    ]


def test_paper_size_config_counts_and_offsets(capsys):
    """Swin-B ZeroI2V: 14M tunable (paper 002, Table 14); the per-stage offsets of its Table 11b."""
    cfg = load_model_config("configs/models/zeroi2v_swin_b_k400_8f.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model_on_meta(cfg)
    report = parameter_report(model)["components"]
    assert round(report["linear_adapters"]["trainable"] / 1e6) == 14
    assert round(report["backbone"]["total"] / 1e6) == 87  # timm's swin_base without its classifier
    offsets = model.config.backbone.head_offsets
    assert [sorted(o for o in stage if o) for stage in offsets] == [
        [1],
        [-1, 1],
        [-2, -1, 1, 2],
        [-2, -2, -1, -1, 1, 1, 2, 2],
    ]
    assert [len(s) for s in offsets] == [4, 8, 16, 32]
    assert main(["model-info", "--config", TINY, "--json"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert tiny["components"]["linear_adapters"]["trainable"] == 2 * (4 * 2 * 48 * 12 + 4 * (12 + 48)) + 2 * (
        4 * 2 * 96 * 24 + 4 * (24 + 96)
    )


def test_finetune_keeps_only_trainable_weights_then_merge_and_predict(tmp_path, capsys):
    """A Swin ZeroI2V finetune run stores no frozen Swin weight; its merge and its export predict as the
    model does."""
    videos = tmp_path / "videos"
    make_folder_dataset(videos, ["left", "right"], {"train": 2, "val": 1}, 32, 6, seed=0)
    plan = plan_finetune(
        "folder",
        videos,
        TINY,
        recipe="configs/finetune/tiny.yaml",
        overrides=["model.backbone.img_size=32", "model.num_classes=2", "data.num_frames=4", "epochs=1"],
    )
    finetune(plan, tmp_path / "run", progress=False)
    state, cfg = load_trainable_checkpoint(tmp_path / "run" / "best.safetensors")
    assert cfg["backbone"]["name"].startswith("swin_")
    frozen = [k for k in state if ".adapter." not in k and not k.startswith("head.")]
    assert not frozen, frozen[:5]
    assert sum(".adapter." in k for k in state) == 4 * (4 * 4)  # 4 blocks, 4 adapters, 4 tensors each
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(tmp_path / "run" / "best.safetensors"), "--out", str(merged)]) == 0
    video = str(next((videos / "val").rglob("*.mp4")))
    probs = []
    export = tmp_path / "export.safetensors"
    assert main(["export", str(tmp_path / "run"), "--out", str(export)]) == 0
    for source in (["--run", str(tmp_path / "run")], ["--model", str(merged)], ["--model", str(export)]):
        capsys.readouterr()
        argv = ["predict", video, *source, "--json", "--decode-workers", "0", "--device", "cpu", "--quiet"]
        assert main(argv) == 0
        (line,) = capsys.readouterr().out.splitlines()
        probs.append({t["label"]: t["prob"] for t in json.loads(line)["top5"]})
    assert set(probs[0]) == {"left", "right"} and math.isclose(sum(probs[0].values()), 1.0, rel_tol=1e-6)
    for label, p in probs[0].items():  # the finetuned model, its merge and export: the same probabilities
        assert probs[1][label] == pytest.approx(p, abs=1e-5) and probs[2][label] == pytest.approx(p, abs=1e-5)


def test_extract_train_evaluate_predict_end_to_end(tmp_path, capsys):
    """A random-init Swin ZeroI2V config extracts its per-frame pooled features (the ones ZeroI2V's own
    classifier averages), heads train and evaluate on them, and predict rebuilds the extractor."""
    videos, store, run = tmp_path / "videos", tmp_path / "train.zarr", tmp_path / "run"
    make_folder_dataset(videos, ["left", "right", "up"], {"train": 2}, 32, 8, seed=0)
    extract = ["extract", "--dataset", "folder", "--root", str(videos), "--split", "train", "--config", TINY]
    assert main([*extract, "--out", str(tmp_path / "f.zarr"), "--flow", *SMALL, "num_frames=4"]) == 2
    assert (
        "has no AM-flow maps; drop --flow" in capsys.readouterr().err and not (tmp_path / "f.zarr").exists()
    )
    assert main([*extract, "--out", str(store), "--decode-workers", "0", *SMALL, "num_frames=4"]) == 0
    st = FeatureStore.open(store)
    assert st.adapter_names == ["pooled"] and st.flow_block_names == []
    clip = st.read_clip(0)  # one adapter sequence of the T per-frame features; cls is the last frame's
    assert clip["embeddings"].shape == (1, 1, 4, 96) and np.array_equal(
        clip["cls"], clip["embeddings"][0, :, -1]
    )
    train_evaluate_predict(
        store, run, videos, ["heads.hidden=16", "heads.flow_maps=false", "epochs=2"], capsys
    )


def test_features_are_zeroi2v_frame_features_unmerged_and_merged(tmp_path):
    """The extractor computes what ZeroI2V's classifier averages: at random init, and from a merged file
    of trained adapters and temporal embedding (the merge is exact, eq. 11)."""
    cfg = load_feature_config(TINY, SMALL)
    video = torch.randn(2, 4, 3, 32, 32)
    model = build_zeroi2v(cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            build_feature_extractor(cfg).extract(video).embeddings[:, 0], model.frame_features(video)
        )
        for m in linear_adapter_modules(model.vit):
            for p in m.adapter.parameters():
                p.normal_(0, 0.05)
        model.head.time_embed.normal_(0, 0.5)
        expected = model.frame_features(video)
        merge_linear_adapters(model.vit)
    save_merged(model, tmp_path / "merged.safetensors")
    features = build_feature_extractor(cfg, str(tmp_path / "merged.safetensors")).extract(video)
    torch.testing.assert_close(features.embeddings[:, 0], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features.cls, expected[:, -1], atol=1e-4, rtol=1e-4)
