"""The AM-flow model against timm's own forward, hand-computed flow, and the paper's parameter counts."""

import dataclasses
import json

import pytest
import timm
import torch

from amflow.cli import main
from stage1_extract.families.backbone import WeightsError
from stage1_extract.methods.am_flow import am_flow, attention_scores_softmax_sum, attention_scores_sum_softmax
from stage1_extract.methods.model_config import BackboneConfig
from stage2_temporal.finetuning.models import AMFlowModelConfig as AMFlowConfig
from stage2_temporal.finetuning.models import build_amflow
from stage2_temporal.heads import LSTMHeadsConfig

TINY_HEADS = LSTMHeadsConfig(hidden=16, layers=1, flow_maps=True, flow_embed=16, flow_hidden=16)


def tiny_cfg(name="vit_tiny_patch16_224", img=32, depth=2, **kw) -> AMFlowConfig:
    timm_kwargs = {"depth": depth, **kw.pop("timm_kwargs", {})}
    return AMFlowConfig(
        backbone=BackboneConfig(name=name, img_size=img, timm_kwargs=timm_kwargs),
        num_frames=4,
        num_classes=3,
        heads=kw.pop("heads", TINY_HEADS),
        **kw,
    )


def plain_timm(cfg: AMFlowConfig, model) -> torch.nn.Module:
    b = cfg.backbone
    ref = timm.create_model(b.name, img_size=b.img_size, num_classes=0, **b.timm_kwargs).eval()
    ref.load_state_dict({k: v for k, v in model.vit.state_dict().items() if "adapter" not in k})
    return ref


@pytest.mark.parametrize(
    "name,img,extra",
    [
        ("vit_small_patch14_dinov2", 224, {}),  # LayerScale, 16x16 patches + CLS = 257 tokens
        ("vit_base_patch16_clip_224", 32, {"embed_dim": 64, "num_heads": 4}),  # pre-norm, QuickGELU-free CLIP
    ],
)
@pytest.mark.parametrize("aggregation", ["sum_softmax", "softmax_sum"])
def test_fresh_adapters_equal_timm_forward(name, img, extra, aggregation):
    cfg = tiny_cfg(name, img, timm_kwargs=extra, aggregation=aggregation)
    model = build_amflow(cfg).eval()
    ref = plain_timm(cfg, model)
    video = torch.randn(1, 4, 3, img, img)
    with torch.no_grad():
        tokens, feats = model.encode(video)
        expected = ref.forward_features(video.flatten(0, 1))
    assert tokens.shape == expected.shape
    if name.endswith("dinov2"):
        assert tokens.shape[1] == 257
    assert (tokens - expected).abs().max().item() <= 1e-5
    assert torch.equal(feats.cls, tokens.reshape(1, 4, *tokens.shape[1:])[:, -1, 0])


def test_sum_softmax_identity_equals_explicit_form():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 17, 8, generator=g), torch.randn(2, 3, 17, 8, generator=g)
    logits = q @ k.transpose(-2, -1) / 8**0.5  # X_A, eq. 1, explicit N x N
    for tau, expected_tau in ((None, 17.0), (1.0, 1.0)):
        explicit = (logits.sum(dim=2) / expected_tau).softmax(dim=-1)
        torch.testing.assert_close(attention_scores_sum_softmax(q, k, tau), explicit, rtol=1e-5, atol=1e-6)
    probs = logits.softmax(dim=-1)
    torch.testing.assert_close(attention_scores_softmax_sum(probs), probs.sum(dim=2) / 17)


def test_am_flow_hand_computed():
    s = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.25, 0.75]]).reshape(1, 3, 1, 2)
    flow = am_flow(s)
    # N * |s_t - s_{t+1}| with N = 2; the last frame repeats the (T-1, T) pair.
    assert flow.reshape(3, 2).tolist() == [[0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]


def test_static_clip_gives_zero_flow():
    model = build_amflow(tiny_cfg()).eval()
    frame = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        feats = model.extract(frame.expand(2, 4, -1, -1, -1).contiguous())
    assert feats.flow.shape == (2, 2, 4, 3, 5)  # 2x2 patches + CLS
    assert torch.count_nonzero(feats.flow) == 0


def moving_square_clip(size=64, patch=8, frames=4):
    """A bright square crossing a dark background left to right, one patch per frame, on row 3."""
    video = torch.zeros(1, frames, 3, size, size)
    for t in range(frames):
        x0 = (2 + t) * patch
        video[0, t, :, 3 * patch : 4 * patch, x0 : x0 + patch] = 3.0
    crossed = [3 * (size // patch) + 2 + t for t in range(frames)]  # patch indices it occupies
    return video, crossed


def test_flow_concentrates_on_the_moving_object():
    cfg = tiny_cfg(img=64, depth=2, timm_kwargs={"patch_size": 8})
    model = build_amflow(cfg).eval()
    video, crossed = moving_square_clip()
    with torch.no_grad():
        flow = model.extract(video).flow  # (1, blocks, T, h, N)
    per_patch = flow[0, 0, :, :, 1:].sum(dim=(0, 1))  # block 1, summed over frames and heads
    mask = torch.zeros_like(per_patch, dtype=torch.bool)
    mask[crossed] = True
    assert per_patch[mask].mean() > 5 * per_patch[~mask].mean()
    assert set(per_patch.topk(len(crossed)).indices.tolist()) == set(crossed)


def test_gradients_reach_only_trainable_parts():
    cfg = tiny_cfg(aligning_encoder=True, aligner_heads=3)
    model = build_amflow(cfg)
    # Make the zero-initialised projections (adapters' W_up, the aligners' last layers) non-zero, so
    # gradients also flow through the adapters into later blocks and into every part of the aligners.
    for name, p in model.named_parameters():
        if ("adapter" in name and ".up." in name) or any(k in name for k in ("out_proj", "linear2")):
            torch.nn.init.normal_(p, std=0.02)
    before = {n: p.detach().clone() for n, p in model.vit.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 4, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        trainable = any(m in name for m in ("adapter", "aligner", "classifier."))
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for name, p in model.vit.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name


def test_aligner_starts_as_the_identity_for_the_flow():
    # The same adapters, heads and backbone with and without aligners: at initialisation the AM flow,
    # the embeddings and the logits are bit-identical (METHOD.md s9's identity start).
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cases = (("all", "previous", "none"), ([2], "previous", "none"), ([2], "first", "none"))
    for blocks, reference, position in (*cases, ("all", "previous", "sincos"), ([2], "first", "sincos")):
        plain = build_amflow(tiny_cfg(blocks=blocks)).eval()
        aligned = build_amflow(
            tiny_cfg(
                blocks=blocks,
                aligning_encoder=True,
                aligner_heads=3,
                aligner_reference=reference,
                aligner_position=position,
            )
        ).eval()
        own = {k: v for k, v in aligned.state_dict().items() if ".aligner." in k}
        aligned.load_state_dict({**own, **plain.state_dict()})
        assert own
        with torch.no_grad():
            a, p = aligned.extract(video), plain.extract(video)
            assert torch.equal(aligned(video), plain(video))
        assert a.flow.abs().sum() > 0
        assert torch.equal(a.flow, p.flow) and torch.equal(a.embeddings, p.embeddings)
        # Moving the aligner's zero-initialised output projection changes the flow: it is wired in.
        block = aligned.vit.blocks[aligned.flow_block_indices[0]]
        torch.nn.init.normal_(block.aligner.layer.self_attn.out_proj.weight, std=0.5)
        with torch.no_grad():
            assert not torch.equal(aligned.extract(video).flow, p.flow)


def test_aligner_position_embedding_is_timms_sincos_table_on_the_patches():
    from timm.layers import build_sincos2d_pos_embed

    from stage1_extract.families.base import BlockGeometry
    from stage1_extract.methods.amflow_model import aligner_position_table

    model = build_amflow(
        tiny_cfg(blocks=[1], aligning_encoder=True, aligner_heads=3, aligner_position="sincos")
    )
    aligner = model.vit.blocks[0].aligner
    table = build_sincos2d_pos_embed([2, 2], 192)  # 32 px in 16 px patches; 192 = ViT-Ti's width
    assert torch.equal(aligner.pos_embed[1:], table) and torch.equal(aligner.pos_embed[0], torch.zeros(192))
    assert "pos_embed" in aligner.no_weight_decay()
    # Tokens in another order (Hiera's mask units): row-major patch i sits at token grid_positions[i].
    order = torch.tensor([2, 0, 3, 1])
    rolled = aligner_position_table(BlockGeometry(grid=(2, 2), heads=3, width=192), order)
    assert torch.equal(rolled[order], table)
    with pytest.raises(ValueError, match="aligner_position"):
        tiny_cfg(aligning_encoder=True, aligner_position="learned").validate()
    plain = build_amflow(tiny_cfg(blocks=[1], aligning_encoder=True, aligner_heads=3))
    assert plain.vit.blocks[0].aligner.pos_embed is None  # the default adds nothing (METHOD.md s1)


def test_aligner_reference_is_where_frame_t_plus_1_is_aligned_to():
    # With "previous" (paper 000's pairs) the flow of pair (3, 4) reads frames 3 and 4 only; with "first"
    # both frames are aligned to frame 1, so changing frame 1 changes that pair's flow (and at the
    # identity start it does not: the flow is the plain one).
    video = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    other = video.clone()
    other[:, 0] = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3))
    changed = {}
    for reference in ("previous", "first"):
        torch.manual_seed(0)
        model = build_amflow(
            tiny_cfg(blocks=[1], aligning_encoder=True, aligner_heads=3, aligner_reference=reference)
        )
        model.eval()
        with torch.no_grad():
            fresh = model.extract(video).flow[0, 0, 2], model.extract(other).flow[0, 0, 2]
        assert torch.equal(*fresh)
        aligner = model.vit.blocks[0].aligner
        torch.nn.init.normal_(aligner.layer.self_attn.out_proj.weight, std=0.5)
        with torch.no_grad():
            changed[reference] = not torch.equal(
                model.extract(video).flow[0, 0, 2], model.extract(other).flow[0, 0, 2]
            )
    assert changed == {"previous": False, "first": True}
    with pytest.raises(ValueError, match="aligner_reference"):
        tiny_cfg(aligning_encoder=True, aligner_reference="last").validate()


def test_local_weights_load_with_timm_keys(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_cfg()
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    for path in ("w.safetensors", "w.pth"):
        model = build_amflow(cfg, weights=str(tmp_path / path))
        for k, v in ref.state_dict().items():
            assert torch.equal(model.vit.state_dict()[k], v), k

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="evil.pth"):
        build_amflow(cfg, weights=str(tmp_path / "evil.pth"))
    with pytest.raises(WeightsError, match="not found"):
        build_amflow(cfg, weights=str(tmp_path / "missing.safetensors"))


def model_info(capsys, config, *overrides):
    assert main(["model-info", "--config", config, "--json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_model_info_matches_paper_counts(capsys):
    m = 1e6
    infos = {}
    for head in ("lstm", "tcn", "transformer"):
        infos[head] = model_info(capsys, f"configs/models/amflow_vitb14_dinov2_am12_{head}.yaml")
    lstm = infos["lstm"]["components"]
    assert set(lstm) == {"backbone", "amflow_linear", "aligning_encoder", "temporal_heads", "last_frame_head"}
    assert 85 * m <= lstm["backbone"]["total"] <= 87 * m and lstm["backbone"]["trainable"] == 0
    assert 28 * m <= lstm["amflow_linear"]["trainable"] <= 32 * m
    assert 40 * m <= lstm["aligning_encoder"]["trainable"] <= 50 * m
    assert 320 * m <= lstm["temporal_heads"]["trainable"] <= 400 * m
    assert 90 * m <= infos["transformer"]["components"]["temporal_heads"]["trainable"] <= 115 * m
    assert 45 * m <= infos["tcn"]["components"]["temporal_heads"]["trainable"] <= 60 * m
    am2 = model_info(capsys, "configs/models/amflow_vitb14_dinov2_am2_lstm.yaml", "aligning_encoder=true")
    for key in ("temporal_heads", "aligning_encoder"):
        assert am2["components"][key]["trainable"] * 6 == lstm[key]["trainable"]
    assert infos["lstm"]["total"] == sum(c["total"] for c in lstm.values())


def test_unknown_block_is_an_error():
    with pytest.raises(ValueError, match=r"blocks \[7\]"):
        build_amflow(tiny_cfg(blocks=[1, 7]))


def test_feature_difference_maps_are_the_control_signal():
    model = build_amflow(tiny_cfg(maps="feature_diff")).eval()
    video = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.extract(video)
        a = model.vit.blocks[0].norm1(model.vit._pos_embed(model.vit.patch_embed(video.flatten(0, 1))))
    assert feats.flow.shape == (1, 2, 4, 1, 5)
    expected = (a[1:] - a[:-1]).abs().mean(dim=-1)  # frames (t, t+1) of block 1's normed tokens
    assert expected[:, 1:].min() > 0  # patch tokens (the CLS token is the same in every frame at block 1)
    torch.testing.assert_close(feats.flow[0, 0, :3, 0], expected)
    torch.testing.assert_close(feats.flow[0, 0, 3, 0], expected[-1])


def test_am_flow_on_an_stdha_backbone_matches_timm_with_stdha():
    """AM flow + STDHA (blocks 1 and 2 adapted, block 3 plain STDHA) against timm's ViT with STDHA."""
    from stage1_extract.methods.stdha import use_stdha

    offsets = [-1, 1, 0]
    cfg = tiny_cfg(depth=3, blocks=[1, 2])
    cfg.backbone.head_offsets = {-1: 1, 1: 1, 0: 1}
    model = build_amflow(cfg).eval()
    ref = plain_timm(cfg, model)
    use_stdha(ref, offsets, num_frames=4)
    plain = build_amflow(tiny_cfg(depth=3, blocks=[1, 2])).eval()
    plain.vit.load_state_dict(model.vit.state_dict())
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, feats = model.encode(video)
        expected = ref.forward_features(video.flatten(0, 1))
        plain_tokens, plain_feats = plain.encode(video)
    assert (tokens - expected).abs().max().item() <= 1e-5
    assert (tokens - plain_tokens).abs().max().item() > 1e-3  # STDHA changes the features...
    # ...but AM flow reads the block's own q, k: block 1 (same input) has the same flow, block 2 not.
    assert torch.equal(feats.flow[:, 0], plain_feats.flow[:, 0])
    assert not torch.equal(feats.flow[:, 1], plain_feats.flow[:, 1])


def test_without_embedding_heads_the_logits_are_the_flow_map_heads():
    heads = dataclasses.replace(TINY_HEADS, last_frame=False)
    model = build_amflow(tiny_cfg(embedding_heads=False, heads=heads)).eval()
    assert model.classifier.temporal_heads is None
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        maps = model.extract(video).flow  # the encoder drops the prefix tokens itself
        expected = model.classifier.flow_heads(model.classifier.flow_encoder(maps)).mean(dim=1)
        torch.testing.assert_close(model(video), expected)
