"""ZeroI2V: linear adapters, exact merge (eq. 11), paper parameter counts, checkpoints, ``amflow merge``."""

from __future__ import annotations

import stage1_extract  # noqa: F401  (before timm: fixes the torchvision import on this machine)

# isort: split
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from amflow.cli import main
from foundation.config import ConfigError, build_config, config_to_dict, load_config
from stage1_extract.methods.checkpoint import (
    CheckpointError,
    load_trainable_checkpoint,
    read_metadata,
    save_trainable_checkpoint,
)
from stage1_extract.methods.linear_adapters import (
    LinearAdapter,
    linear_adapter_modules,
    merge_linear_adapters,
)
from stage1_extract.methods.stdha import STDHAttention, use_stdha
from stage1_extract.methods.zeroi2v import split_merged_state
from stage2_temporal.zeroi2v.model import (
    ZeroI2VConfig,
    ZeroI2VHead,
    ZeroI2VModel,
    build_zeroi2v,
    load_merged,
    merge_checkpoint,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:backbone .* is randomly initialised:UserWarning")

TINY = [
    "backbone.img_size=32",
    "backbone.timm_kwargs={patch_size: 8, depth: 2}",
    "num_frames=3",
    "num_classes=5",
]


def tiny_config(*overrides: str) -> ZeroI2VConfig:
    return load_config(ZeroI2VConfig, "models/zeroi2v_tiny.yaml", [*TINY, *overrides])


def plain_vit(cfg: ZeroI2VConfig) -> torch.nn.Module:
    b = cfg.backbone
    return timm.create_model(b.name, num_classes=0, img_size=b.img_size, **b.timm_kwargs)


def randomise(model: torch.nn.Module) -> None:
    """Non-zero values for every trainable tensor (adapters' W_up included), so the merge has work to do."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_adapter_merge_equals_applying_it(position, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=bias)
    adapter = LinearAdapter(6 if position == "before" else 5, 3, scale=0.5, dropout=0.5, bias=bias).eval()
    assert torch.equal(
        adapter(torch.ones(2, adapter.down.in_features)), torch.ones(2, adapter.down.in_features)
    )
    torch.nn.init.normal_(adapter.up.weight)
    if bias:
        torch.nn.init.normal_(adapter.up.bias)
    x = torch.randn(4, 6)
    expected = linear(adapter(x)) if position == "before" else adapter(linear(x))
    merged = adapter.merge_before(linear) if position == "before" else adapter.merge_after(linear)
    assert type(merged) is torch.nn.Linear and (merged.bias is None) == (not bias)
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "places",
    [
        ["before_qkv"],
        ["after_proj"],
        ["before_fc1"],
        ["after_fc2"],
        ["before_qkv", "after_proj", "before_fc1", "after_fc2"],
        ["before_q", "before_v"],
        ["before_q", "before_k", "before_v", "after_proj", "before_fc1", "after_fc2"],  # Table 11b, 6
    ],
)
def test_merge_is_exact_at_every_place(places):
    cfg = tiny_config(f"adapter.places={places}")
    model = build_zeroi2v(cfg)
    randomise(model)
    model.eval()
    video = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(video)
        merge_linear_adapters(model.vit)
        merged = model(video)
    assert rel_err(merged, unmerged) <= 1e-4
    plain = plain_vit(cfg)
    assert list(model.vit.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in model.vit.parameters()) == sum(p.numel() for p in plain.parameters())
    assert all(isinstance(b.attn, STDHAttention) for b in model.vit.blocks)
    assert not linear_adapter_modules(model)


def test_qkv_places_adapt_each_part_and_exclude_before_qkv():
    model = build_zeroi2v(tiny_config("adapter.places=[before_k]"))
    randomise(model)
    qkv = model.vit.blocks[0].attn.qkv
    x = torch.randn(2, 5, qkv.in_features)
    w, b = qkv.weight.chunk(3), qkv.bias.chunk(3)
    with torch.no_grad():  # Q and V read x, K reads A_k(x)
        expected = torch.cat(
            [x @ w[0].T + b[0], qkv.adapter["k"].eval()(x) @ w[1].T + b[1], x @ w[2].T + b[2]], -1
        )
        torch.testing.assert_close(qkv(x), expected)
    assert any(k.endswith("attn.qkv.adapter.k.down.weight") for k in model.state_dict())
    with pytest.raises(ConfigError, match="before_qkv .* and before_q/k/v"):
        tiny_config("adapter.places=[before_qkv, before_k]")


def test_fresh_model_is_the_image_model_and_plain_weights_load(tmp_path):
    cfg = tiny_config("backbone.head_offsets=[0, 0, 0]")
    plain = plain_vit(cfg).eval()
    weights = tmp_path / "plain.safetensors"
    save_file(plain.state_dict(), str(weights))
    cfg = tiny_config("backbone.head_offsets=[0, 0, 0]", f"backbone.weights={weights}")
    model = build_zeroi2v(cfg).eval()
    video = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        features = model.frame_features(video)
        reference = plain(video.flatten(0, 1)).unflatten(0, (2, 3))
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)


def test_gradients_reach_only_adapters_and_head():
    model = build_zeroi2v(tiny_config())
    model.train()
    model(torch.randn(1, 3, 3, 32, 32)).sum().backward()
    parts = model.components()
    assert all(p.grad is None and not p.requires_grad for p in parts["backbone"])
    assert all(p.grad is not None for p in parts["linear_adapters"] + parts["classifier"])
    assert len(parts["linear_adapters"]) == 2 * 4 * 4  # blocks x places x (W_down, b_down, W_up, b_up)


@pytest.mark.parametrize(("ratio", "paper_m"), [(0.0625, 3), (0.125, 7), (0.25, 14), (0.5, 28)])
def test_tunable_parameters_vitb16_paper_table2(ratio, paper_m):
    cfg = load_config(ZeroI2VConfig, "models/zeroi2v_vitb16_clip_k400_8f.yaml", [f"adapter.ratio={ratio}"])
    with torch.device("meta"):
        model = build_zeroi2v(cfg)
    tunable = sum(p.numel() for p in model.components()["linear_adapters"])
    r = round(768 * ratio)
    # blocks x adapters x (W_down, b_down, W_up, b_up)
    assert tunable == 12 * 4 * (768 * r + r + r * 768 + 768)
    assert int(tunable / 1e6) == paper_m  # the paper's Table 2 truncates to whole millions
    if paper_m >= 7:  # 0.0625 gives 3.58M: 19% above the truncated "3", consistent with truncation
        assert abs(tunable / 1e6 - paper_m) / paper_m <= 0.10
    backbone = sum(p.numel() for p in model.components()["backbone"])
    assert backbone == 85_799_424  # timm's CLIP ViT-B/16 without classifier


def test_configs_resolve_the_papers_head_assignments():
    expected = {
        "zeroi2v_vitb16_clip_k400_8f": [-1, 1] + [0] * 10,
        "zeroi2v_vitb16_clip_ssv2_16f": [-1, 1, -2, 2] + [0] * 8,
        "zeroi2v_vitl14_clip_8f": [-1, -1, 1, 1] + [0] * 12,  # the release (shift_div=8)
        "zeroi2v_tiny": [-1, 1, 0],
    }
    for name, offsets in expected.items():
        with torch.device("meta"):
            model = build_zeroi2v(load_config(ZeroI2VConfig, f"models/{name}.yaml"))
        assert model.config.backbone.head_offsets == offsets, name
        assert [b.attn.head_offsets for b in model.vit.blocks] == [offsets] * len(model.vit.blocks)
    # (a multiset override merges into the file's mapping, so replace the whole section here)
    bad = config_to_dict(tiny_config())
    bad["backbone"]["head_offsets"] = {-3: 1, 0: 2}
    with pytest.raises(ConfigError, match=r"offsets \[-3\] reach outside every 3-frame clip"):
        build_config(ZeroI2VConfig, bad)
    bad["backbone"]["head_offsets"] = {1: 1, 0: 3}
    with pytest.raises(ValueError, match="has 4 heads, the backbone has 3"):
        build_zeroi2v(build_config(ZeroI2VConfig, bad))


def test_checkpoint_and_amflow_merge_roundtrip(tmp_path, capsys):
    cfg = tiny_config()
    weights = tmp_path / "backbone.safetensors"
    save_file(plain_vit(cfg).state_dict(), str(weights))
    model = build_zeroi2v(tiny_config(f"backbone.weights={weights}"))
    randomise(model)
    ckpt = tmp_path / "best.safetensors"
    save_trainable_checkpoint(model, model.config, ckpt)
    state, stored = load_trainable_checkpoint(ckpt)
    assert set(state) == {"vit." + n for n, p in model.vit.named_parameters() if p.requires_grad} | {
        "head.time_embed",
        "head.fc.weight",
        "head.fc.bias",
    }
    assert stored["backbone"]["head_offsets"] == [-1, 1, 0] and stored["backbone"]["weights"] == str(weights)

    out = tmp_path / "merged.safetensors"
    argv = ["merge", str(ckpt), "--out", str(out)]
    assert main(argv) == 0
    assert "adapters merged   8" in capsys.readouterr().out

    vit_state, head_state = split_merged_state(load_file(str(out)))
    assert set(head_state) == {"time_embed", "fc.weight", "fc.bias"}
    vit = plain_vit(cfg)
    vit.load_state_dict(vit_state, strict=True)  # the plain timm class, no adapter modules
    use_stdha(vit, [-1, 1, 0], num_frames=3)
    head = ZeroI2VHead(3, vit.embed_dim, 5)
    head.load_state_dict(head_state)
    video = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        unmerged = model.eval()(video)
        assert rel_err(ZeroI2VModel(vit, head).eval()(video), unmerged) <= 1e-4
        assert rel_err(ZeroI2VModel(*load_merged(out))(video), unmerged) <= 1e-4

    # No silent overwrite; a changed backbone file is refused; another model kind is refused (user errors:
    # exit 2, as every command).
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    torch.manual_seed(5)
    save_file({k: torch.randn_like(v) for k, v in plain_vit(cfg).state_dict().items()}, str(weights))
    assert main(["merge", str(ckpt), "--out", str(tmp_path / "again.safetensors")]) == 2
    assert "differ" in capsys.readouterr().err
    assert not (tmp_path / "again.safetensors").exists()
    other = tmp_path / "amflow.safetensors"
    save_trainable_checkpoint(torch.nn.Linear(2, 2), {"kind": "amflow"}, other)
    assert read_metadata(other)["format"] == "amflow-trainable-1"
    with pytest.raises(CheckpointError, match="'amflow' model"):
        merge_checkpoint(other, tmp_path / "x.safetensors")
