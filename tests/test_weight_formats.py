"""Weights in every format users hold: loaded through amflow, the backbone gives the format's own features.

Each test builds a tiny random model with the format's own library (timm, a facebookresearch-layout
DINOv2 module written here, open_clip, transformers), saves it as that library saves it, loads it with
``create_backbone(weights=...)`` and compares features in float32 at the model's native size (<= 1e-4
relative). Parameters are perturbed first so that a swapped norm or projection cannot hide behind the
libraries' ones/zeros initialisations.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from stage1_extract.families.backbone import WeightsError, create_backbone

TOL = 1e-4


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def pre_norm_tokens(vit) -> torch.Tensor:
    """timm's tokens after the last block, before the final norm (for transformers' CLIP outputs)."""
    x = images(32)
    return vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))


def test_timm_own_format(tmp_path):
    torch.manual_seed(0)
    kw = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)
    ref = perturb(timm.create_model("vit_small_patch16_224", num_classes=10, img_size=32, **kw))
    save_file(ref.state_dict(), tmp_path / "timm.safetensors")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "timm.pth")
    x = images(32)
    for name in ("timm.safetensors", "timm.pth"):
        vit = create_backbone("vit_small_patch16_224", 32, tmp_path / name, **kw).eval()
        with torch.no_grad():
            d = rel_diff(vit.forward_features(x), ref.forward_features(x))
        assert d <= TOL, (name, d)


class ReleaseDinoV2(nn.Module):
    """A DINOv2 ViT in the facebookresearch release's layout (``dinov2/models/vision_transformer.py``):
    ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``mask_token``, ``blocks.N.{norm1, attn.qkv,
    attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``; LayerNorm eps 1e-6, GELU."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 2, patch: int = 14, img: int = 56):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.ls1, b.ls2 = nn.Module(), nn.Module()
            b.ls1.gamma, b.ls2.gamma = nn.Parameter(torch.full((dim,), 1e-5)), nn.Parameter(torch.ones(dim))
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for b in self.blocks:
            B, N, C = x.shape
            qkv = b.attn.qkv(b.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * (C // self.heads) ** -0.5, qkv[1], qkv[2]
            a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
            x = x + b.ls1.gamma * b.attn.proj(a.transpose(1, 2).reshape(B, N, C))
            x = x + b.ls2.gamma * b.mlp.fc2(F.gelu(b.mlp.fc1(b.norm2(x))))
        return self.norm(x)


def test_original_dinov2_release(tmp_path):
    torch.manual_seed(0)
    ref = perturb(ReleaseDinoV2())
    torch.save(ref.state_dict(), tmp_path / "dinov2_vits14.pth")
    vit = create_backbone(
        "vit_small_patch14_dinov2", 56, tmp_path / "dinov2_vits14.pth", embed_dim=64, depth=2, num_heads=2
    ).eval()
    x = images(56)
    with torch.no_grad():
        d = rel_diff(vit.forward_features(x), ref(x))
    assert d <= TOL, d


def _open_clip_model(quick_gelu: bool = True):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return perturb(CLIP(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu))


CLIP_KW = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)


def test_openai_clip_and_open_clip_full_and_visual_tower(tmp_path):
    model = _open_clip_model()
    torch.save(model.state_dict(), tmp_path / "clip_full.pt")  # open_clip's full CLIP state dict
    save_file(model.visual.state_dict(), tmp_path / "clip_visual.safetensors")  # the image tower alone
    text = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and constant-folding notes
        traced = torch.jit.trace(model, (images(32), text), strict=False, check_trace=False)
    traced.save(str(tmp_path / "ViT-B-16.pt"))  # OpenAI's own files are TorchScript archives
    x = images(32)
    with torch.no_grad():
        ref = model.encode_image(x)  # ln_post(CLS) @ proj
    for name in ("clip_full.pt", "clip_visual.safetensors", "ViT-B-16.pt"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a QuickGELU model takes OpenAI's weights without a warning
            vit = create_backbone(
                "vit_base_patch16_clip_quickgelu_224", 32, tmp_path / name, **CLIP_KW
            ).eval()
        with torch.no_grad():
            d = rel_diff(vit.forward_features(x)[:, 0] @ model.visual.proj, ref)
        assert d <= TOL, (name, d)


def test_clip_weights_into_a_gelu_model_warn_naming_the_quickgelu_model(tmp_path):
    model = _open_clip_model()
    torch.save(model.state_dict(), tmp_path / "clip_full.pt")
    with pytest.warns(UserWarning, match="vit_base_patch16_clip_quickgelu_224"):
        vit = create_backbone("vit_base_patch16_clip_224", 32, tmp_path / "clip_full.pt", **CLIP_KW).eval()
    x = images(32)
    with torch.no_grad():
        d = rel_diff(vit.forward_features(x)[:, 0] @ model.visual.proj, model.encode_image(x))
    assert d > 10 * TOL  # GELU really changes the features: the warning is needed


def test_hf_dinov2_save_pretrained_folder_and_file(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56
    )
    ref = perturb(Dinov2Model(cfg))
    ref.save_pretrained(tmp_path / "dinov2_hf")
    x = images(56)
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state
    for path in (tmp_path / "dinov2_hf", tmp_path / "dinov2_hf" / "model.safetensors"):
        vit = create_backbone("vit_small_patch14_dinov2", 56, path, embed_dim=64, depth=2, num_heads=2).eval()
        with torch.no_grad():
            d = rel_diff(vit.forward_features(x), expected)
        assert d <= TOL, (path, d)


def _hf_clip_vision_config(act: str = "quick_gelu"):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        hidden_act=act,
    )


def _check_hf_clip_vision(vit, vision_model) -> None:
    x = images(32)
    with torch.no_grad():
        out = vision_model(pixel_values=x)
        pooled = rel_diff(vit.forward_features(x)[:, 0], out.pooler_output)  # post_layernorm(CLS)
        tokens = rel_diff(pre_norm_tokens(vit), out.last_hidden_state)  # transformers leaves tokens unnormed
    assert pooled <= TOL and tokens <= TOL, (pooled, tokens)


def test_hf_clip_vision_model(tmp_path):
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    ref = perturb(CLIPVisionModel(_hf_clip_vision_config()))
    ref.save_pretrained(tmp_path / "clip_vision_hf")
    for path in (tmp_path / "clip_vision_hf", tmp_path / "clip_vision_hf" / "model.safetensors"):
        vit = create_backbone("vit_base_patch16_clip_quickgelu_224", 32, path, **CLIP_KW).eval()
        _check_hf_clip_vision(vit, ref)


def test_hf_clip_model_and_its_config_checks(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=text.to_dict(), vision_config=_hf_clip_vision_config().to_dict(), projection_dim=48
    )
    ref = perturb(CLIPModel(cfg))
    ref.save_pretrained(tmp_path / "clip_hf")
    vit = create_backbone("vit_base_patch16_clip_quickgelu_224", 32, tmp_path / "clip_hf", **CLIP_KW).eval()
    _check_hf_clip_vision(vit, ref.vision_model)
    # config.json says quick_gelu: a GELU backbone is warned about, naming the QuickGELU model
    with pytest.warns(UserWarning, match="hidden_act='quick_gelu'.*vit_base_patch16_clip_quickgelu_224"):
        create_backbone("vit_base_patch16_clip_224", 32, tmp_path / "clip_hf", **CLIP_KW)


def test_a_file_of_another_width_is_refused_naming_the_format(tmp_path):
    model = _open_clip_model()
    torch.save(model.state_dict(), tmp_path / "clip_full.pt")
    with pytest.raises(WeightsError, match="OpenAI CLIP / open_clip.*do not fit"):
        create_backbone(
            "vit_base_patch16_clip_quickgelu_224", 32, tmp_path / "clip_full.pt", depth=2, patch_size=8
        )
    with pytest.raises(WeightsError, match="without weights"):
        create_backbone("vit_base_patch16_clip_quickgelu_224", 32, tmp_path, **CLIP_KW)
