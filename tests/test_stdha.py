"""STDHA (paper 002, eqs. 7-9): head offsets, the K/V shift, and the attention output against hand values."""

from __future__ import annotations

import math

import stage1_extract  # noqa: F401  (before timm: fixes the torchvision import on this machine)

# isort: split
import pytest
import timm
import torch
from timm.layers import Attention

from stage1_extract.methods.stdha import STDHAttention, expand_head_offsets, temporal_shift_kv, use_stdha

torch.set_num_threads(1)


def test_expand_head_offsets_documented_order():
    assert expand_head_offsets({1: 1, -1: 1, 0: 10}, 12) == [-1, 1] + [0] * 10
    assert expand_head_offsets({-1: 2, 1: 2, 0: 12}, 16) == [-1, -1, 1, 1] + [0] * 12  # release, shift_div=8
    assert expand_head_offsets({2: 1, -2: 1, 1: 1, -1: 1, 0: 8}, 12) == [-1, 1, -2, 2] + [0] * 8
    # every -m head, then every +m head, magnitude by magnitude, spatial heads last
    assert expand_head_offsets({1: 2, -1: 1, 3: 1, 0: 1}, 5) == [-1, 1, 1, 3, 0]
    assert expand_head_offsets([0, 2, -1], 3) == [0, 2, -1]
    with pytest.raises(ValueError, match="has 11 heads, the backbone has 12"):
        expand_head_offsets({1: 1, 0: 10}, 12)
    with pytest.raises(ValueError, match="2 offsets"):
        expand_head_offsets([1, -1], 3)


def _coded(B: int, T: int, h: int, N: int) -> torch.Tensor:
    """k[b*T + t, j, n, 0] = 100 b + 10 t + j + n / 10: every entry names its clip, frame, head, token."""
    b, t, j, n = torch.meshgrid(
        torch.arange(B), torch.arange(T), torch.arange(h), torch.arange(N), indexing="ij"
    )
    return (100 * b + 10 * t + j + n / 10).reshape(B * T, h, N, 1).float()


def test_temporal_shift_kv_hand_example_with_edges():
    k = _coded(B=2, T=3, h=2, N=2)
    v = -k
    k2, v2 = temporal_shift_kv(k, v, num_frames=3, head_offsets=[-1, +1])
    # Head 0 (dt = -1): frames 0,1,2 read frames 0 (edge: own), 0, 1.
    # Head 1 (dt = +1): frames 0,1,2 read frames 1, 2, 2 (edge: own).
    clip0 = torch.tensor(
        [
            [[0.0, 0.1], [11.0, 11.1]],
            [[0.0, 0.1], [21.0, 21.1]],
            [[10.0, 10.1], [21.0, 21.1]],
        ]
    )
    expected = torch.cat([clip0, clip0 + 100]).unsqueeze(-1)  # clip 1 never reads clip 0's frames
    torch.testing.assert_close(k2, expected)
    torch.testing.assert_close(v2, -expected)


def test_temporal_shift_kv_zero_offsets_returns_inputs_and_checks_shapes():
    k = _coded(B=1, T=4, h=3, N=2)
    k2, v2 = temporal_shift_kv(k, k, 4, [0, 0, 0])
    assert k2 is k and v2 is k
    with pytest.raises(ValueError, match="whole number of 3-frame clips"):
        temporal_shift_kv(k, k, 3, [1, 0, 0])
    with pytest.raises(ValueError, match="2 head offsets for 3 heads"):
        temporal_shift_kv(k, k, 4, [1, 0])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_stdha_zero_offsets_equals_timm_attention_exactly(fused, qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()
    attn.fused_attn = fused
    stdha = STDHAttention.from_attention(attn, num_frames=3, head_offsets=[0, 0, 0, 0])
    assert stdha.qkv is attn.qkv and stdha.proj.weight is attn.proj.weight
    assert list(stdha.state_dict()) == list(attn.state_dict())
    x = torch.randn(6, 5, 32)
    with torch.no_grad():
        assert torch.equal(stdha(x), attn(x))


def _hand_attention(x: list, source: list, t: int) -> list:
    """Frame t's output with q = k = v = x per head (d = 1, scale 1) and K/V from frame source[t][j]."""
    out = []
    for i in range(len(x[t])):
        row = []
        for j in range(len(x[t][i])):
            s = source[t][j]
            logits = [x[t][i][j] * x[s][n][j] for n in range(len(x[s]))]
            weights = [math.exp(a) for a in logits]
            row.append(sum(w * x[s][n][j] for n, w in enumerate(weights)) / sum(weights))
        out.append(row)
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_stdha_hand_example_three_frames_two_heads(fused):
    # Two heads of width 1; qkv copies each input channel to its head's q, k and v; proj is the identity.
    attn = Attention(2, num_heads=2, qkv_bias=True).eval()
    attn.fused_attn = fused
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(3, 1))
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(2))
        attn.proj.bias.zero_()
    x = [
        [[0.5, -1.0], [1.0, 0.2]],
        [[-0.3, 0.8], [0.7, -0.6]],
        [[1.2, 0.4], [-0.9, 1.1]],
    ]
    source = [[0, 1], [0, 2], [1, 2]]  # frame t, head j -> frame read: offsets (-1, +1), edges keep their own
    expected = torch.tensor([_hand_attention(x, source, t) for t in range(3)])
    stdha = STDHAttention.from_attention(attn, num_frames=3, head_offsets=[-1, 1])
    with torch.no_grad():
        out = stdha(torch.tensor(x))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_use_stdha_on_vit_keeps_keys_shares_weights_and_uses_fused_attention(monkeypatch):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2).eval()
    keys = list(vit.state_dict())
    qkv = vit.blocks[0].attn.qkv.weight
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        reference = vit(x)
    use_stdha(vit, {0: 3}, num_frames=3)
    assert all(isinstance(b.attn, STDHAttention) for b in vit.blocks)
    assert vit.blocks[0].attn.qkv.weight is qkv and list(vit.state_dict()) == keys
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    counting = lambda *a, **k: calls.append(1) or sdpa(*a, **k)  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        assert torch.equal(vit(x), reference)
    assert len(calls) == 2  # one fused call per block
    use_stdha(vit, {-1: 1, 1: 1, 0: 1}, num_frames=3, blocks=[1])
    assert vit.blocks[0].attn.head_offsets == [0, 0, 0] and vit.blocks[1].attn.head_offsets == [-1, 1, 0]
    with torch.no_grad():
        shifted = vit(x)
    assert not torch.allclose(shifted, reference)


def test_a_shift_first_made_in_inference_mode_still_trains():
    """The cached gather index must not be an inference tensor (predict, then finetune, in one process)."""
    from stage1_extract.methods.stdha import temporal_shift_kv

    k = torch.randn(2 * 3, 2, 5, 4)
    with torch.inference_mode():
        temporal_shift_kv(k, k, 3, (1, -1))
    q = k.clone().requires_grad_(True)
    shifted, _ = temporal_shift_kv(q, q, 3, (1, -1))
    shifted.sum().backward()
    assert q.grad is not None and torch.equal(q.grad.sum(dim=(1, 2, 3)), torch.full((6,), 40.0))
