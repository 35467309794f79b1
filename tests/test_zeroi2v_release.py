"""Official ZeroI2V checkpoints: ``amflow convert`` gives a model with the release's logits.

The test writes a checkpoint with the release's key names (MCG-NJU/ZeroI2V, mmaction2:
``backbone.transformer.resblocks.N.{T_Adapter_in,S_Adapter,MLP_Adapter,MLP_Adapter_out}``,
``attn.in_proj_weight``, ``cls_head.fc_cls``) and random tensors, and computes the logits with a reference
forward written here from the release's ``vit_zero_clip.py`` / ``vit_zero_clip_ablation.py`` and
``common/stdha.py`` (channel-block ``TemporalShift`` of K and V, QuickGELU, adapters
``x + scale · D_fc2(D_fc1(x))``, I3D head = mean over frames, then ``fc_cls``). The converted checkpoint,
its merge, finetuning initialisation and ``extract --checkpoint`` must all reproduce it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from amflow.cli import main as cli
from foundation.config import build_config
from stage1_extract.extraction.extract import load_extraction_model
from stage1_extract.methods.checkpoint import load_into, load_trainable_checkpoint
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.finetuning.finetune import finetune, plan_finetune
from stage2_temporal.finetuning.models import load_model_config
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v, load_merged

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

D, HEADS, LAYERS, PATCH, IMG, T, CLASSES, SCALE = 64, 4, 2, 8, 32, 4, 4, 0.5
SHARE = ["T_Adapter_in", "S_Adapter", "MLP_Adapter", "MLP_Adapter_out"]  # vit_zero_clip.py, num_tadapter=2
QKV = ["T_Adapter_in_q", "T_Adapter_in_k", "T_Adapter_in_v", "S_Adapter", "MLP_Adapter", "MLP_Adapter_out"]


def release_state(adapters: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the release's checkpoint keys (``model.state_dict()`` of Recognizer3D)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    p, n = "backbone.", (IMG // PATCH) ** 2 + 1
    sd = {
        p + "conv1.weight": r(D, 3, PATCH, PATCH),
        p + "class_embedding": r(D, std=0.2),
        p + "positional_embedding": r(n, D, std=0.2),
        p + "temporal_embedding": r(1, T, D, std=0.2),
        p + "ln_pre.weight": r(D, mean=1.0),
        p + "ln_pre.bias": r(D),
        p + "ln_post.weight": r(D, mean=1.0),
        p + "ln_post.bias": r(D),
        "cls_head.fc_cls.weight": r(CLASSES, D, std=0.2),
        "cls_head.fc_cls.bias": r(CLASSES),
    }
    for i in range(LAYERS):
        b = f"{p}transformer.resblocks.{i}."
        sd |= {
            b + "ln_1.weight": r(D, mean=1.0),
            b + "ln_1.bias": r(D),
            b + "attn.in_proj_weight": r(3 * D, D, std=0.15),
            b + "attn.in_proj_bias": r(3 * D),
            b + "attn.out_proj.weight": r(D, D, std=0.1),
            b + "attn.out_proj.bias": r(D),
            b + "ln_2.weight": r(D, mean=1.0),
            b + "ln_2.bias": r(D),
            b + "mlp.c_fc.weight": r(4 * D, D, std=0.1),
            b + "mlp.c_fc.bias": r(4 * D),
            b + "mlp.c_proj.weight": r(D, 4 * D, std=0.05),
            b + "mlp.c_proj.bias": r(D),
        }
        for name in adapters:  # trained adapters: D_fc2 is no longer zero
            sd |= {
                b + f"{name}.D_fc1.weight": r(D // 4, D, std=0.2),
                b + f"{name}.D_fc1.bias": r(D // 4),
                b + f"{name}.D_fc2.weight": r(D, D // 4, std=0.2),
                b + f"{name}.D_fc2.bias": r(D),
            }
    return sd


def temporal_shift(x, shift_div, long_shift_div=-1, long_shift_right=False):
    """The release's ``TemporalShift`` (divide_head=False) on (n, B·T, C): channel blocks move in time."""
    n, bt, c = x.shape
    feat = x.view(n, bt // T, T, c)
    out = feat.clone()
    fold = c // shift_div
    out[:, :, 1:, :fold] = feat[:, :, :-1, :fold]  # shift left: frame t reads frame t-1
    out[:, :, :-1, fold : 2 * fold] = feat[:, :, 1:, fold : 2 * fold]  # shift right: t reads t+1
    if long_shift_div > 0:
        lf = c // long_shift_div
        out[:, :, 2:, 2 * fold : 2 * fold + lf] = feat[:, :, :-2, 2 * fold : 2 * fold + lf]
        if long_shift_right:
            out[:, :, :-2, 2 * fold + lf : 2 * fold + 2 * lf] = feat[
                :, :, 2:, 2 * fold + lf : 2 * fold + 2 * lf
            ]
    return out.view(n, bt, c)


@torch.no_grad()
def release_logits(sd, video, adapters, shift):
    """The release's ``ViT_Zero_CLIP`` + I3D head forward (eval mode) on a normalised (B, T, 3, H, W)."""
    p = "backbone."
    B = video.shape[0]

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    def adapter(x, block, name):
        a = f"{block}{name}."
        h = F.linear(F.linear(x, sd[a + "D_fc1.weight"], sd[a + "D_fc1.bias"]), sd[a + "D_fc2.weight"])
        return x + (h + sd[a + "D_fc2.bias"]) * SCALE

    x = F.conv2d(video.flatten(0, 1), sd[p + "conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd[p + "class_embedding"] + torch.zeros(x.shape[0], 1, D)
    x = torch.cat([cls, x], dim=1) + sd[p + "positional_embedding"]
    n = x.shape[1]
    x = x.view(B, T, n, D) + sd[p + "temporal_embedding"].unsqueeze(2)  # '(b t) n d -> (b n) t d' + temb
    x = ln(x.view(B * T, n, D), p + "ln_pre").permute(1, 0, 2)  # (n, BT, D)
    hd = D // HEADS
    for i in range(LAYERS):
        b = f"{p}transformer.resblocks.{i}."
        h = ln(x, b + "ln_1")
        if "T_Adapter_in" in adapters:
            q_in = k_in = v_in = adapter(h, b, "T_Adapter_in")
        else:
            q_in, k_in, v_in = (adapter(h, b, f"T_Adapter_in_{c}") for c in "qkv")
        w, bias = sd[b + "attn.in_proj_weight"].chunk(3), sd[b + "attn.in_proj_bias"].chunk(3)
        q, k, v = (F.linear(t, w[j], bias[j]) for j, t in enumerate((q_in, k_in, v_in)))
        k, v = temporal_shift(k, *shift), temporal_shift(v, *shift)
        q, k, v = (t.contiguous().view(n, B * T * HEADS, hd).transpose(0, 1) for t in (q, k, v))
        a = ((q * hd**-0.5) @ k.transpose(1, 2)).softmax(-1) @ v
        a = F.linear(
            a.transpose(0, 1).reshape(n, B * T, D),
            sd[b + "attn.out_proj.weight"],
            sd[b + "attn.out_proj.bias"],
        )
        x = x + adapter(a, b, "S_Adapter")
        m = adapter(ln(x, b + "ln_2"), b, "MLP_Adapter")
        m = F.linear(m, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        m = F.linear(m * torch.sigmoid(1.702 * m), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        x = x + adapter(m, b, "MLP_Adapter_out")
    cls = ln(x.permute(1, 0, 2)[:, 0], p + "ln_post").view(B, T, D).mean(1)  # I3D head: average over T
    return F.linear(cls, sd["cls_head.fc_cls.weight"], sd["cls_head.fc_cls.bias"])


CASES = {
    # vit_zero_clip.py, 4 adapters; shift_div=2 moves two heads back and two ahead, as ViT-L's shift_div=8
    "share": (SHARE, (2,), {-1: 2, 1: 2}, ["before_qkv", "after_proj", "before_fc1", "after_fc2"]),
    # vit_zero_clip_ablation.py, attn_adapter_type='qkv' (Table 11b, 6 adapters); heads -1, +1, -2, +2
    "qkv": (
        QKV,
        (4, 4, True),
        {-1: 1, 1: 1, -2: 1, 2: 1},
        ["before_q", "before_k", "before_v", "after_proj", "before_fc1", "after_fc2"],
    ),
}


def model_yaml(path, head_offsets, places, num_frames=T):
    cfg = {
        "kind": "zeroi2v",
        "backbone": {
            "name": "vit_base_patch16_clip_quickgelu_224",
            "img_size": IMG,
            "timm_kwargs": {"embed_dim": D, "depth": LAYERS, "num_heads": HEADS, "patch_size": PATCH},
            "head_offsets": head_offsets,
        },
        "num_frames": num_frames,
        "num_classes": CLASSES,
        "adapter": {"ratio": 0.25, "scale": SCALE, "dropout": 0.1, "places": places},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_release_checkpoint_gives_the_release_logits(case, tmp_path):
    adapters, shift, offsets, places = CASES[case]
    sd = release_state(adapters)
    torch.save({"meta": {"epoch": 40}, "state_dict": sd}, tmp_path / "release.pth")  # as mmengine saves
    config = model_yaml(tmp_path / "model.yaml", offsets, places)
    video = torch.randn(2, T, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    expected = release_logits(sd, video, adapters, shift)

    out = tmp_path / "amflow.safetensors"
    assert cli(["convert", str(tmp_path / "release.pth"), "--config", str(config), "--out", str(out)]) == 0
    state, stored = load_trainable_checkpoint(out)
    model = build_zeroi2v(build_config(ZeroI2VConfig, stored))
    load_into(model, state, out)
    with torch.no_grad():
        assert rel(model.eval()(video), expected) <= 1e-4

    merged = tmp_path / "merged.safetensors"
    assert cli(["merge", str(out), "--out", str(merged)]) == 0
    with torch.no_grad():
        assert rel(ZeroI2VModel(*load_merged(merged))(video), expected) <= 1e-4

    # extract --checkpoint: an AM-flow config of the same backbone runs on the merged STDHA backbone
    amflow_cfg = load_model_config(
        "configs/models/amflow_tiny.yaml",
        [
            "backbone.name=vit_base_patch16_clip_quickgelu_224",
            f"backbone.img_size={IMG}",
            "backbone.timm_kwargs={embed_dim: 64, depth: 2, num_heads: 4, patch_size: 8}",
            f"num_frames={T}",
            "blocks=[1]",
        ],
    )
    extraction = load_extraction_model(amflow_cfg, str(out), torch.device("cpu"))
    vit, _ = load_merged(merged)
    # block 1 is an AM-flow block (it applies STDHA itself), block 2 timm's block with STDHA attention
    assert extraction.vit.blocks[0].head_offsets == vit.blocks[0].attn.head_offsets
    assert extraction.vit.blocks[1].attn.head_offsets == vit.blocks[1].attn.head_offsets
    for i in range(LAYERS):
        assert torch.equal(extraction.vit.blocks[i].attn.qkv.weight, vit.blocks[i].attn.qkv.weight)


def test_finetuning_starts_from_a_converted_checkpoint(tmp_path):
    adapters, _, offsets, places = CASES["share"]
    torch.save({"state_dict": release_state(adapters)}, tmp_path / "release.pth")
    config = model_yaml(tmp_path / "model.yaml", offsets, places)
    out = tmp_path / "amflow.safetensors"
    assert cli(["convert", str(tmp_path / "release.pth"), "--config", str(config), "--out", str(out)]) == 0
    videos = tmp_path / "videos"
    make_folder_dataset(videos, ["left", "right", "up", "down"], {"train": 1, "val": 1}, IMG, 8, seed=0)
    stored = load_trainable_checkpoint(out)[1]
    (tmp_path / "converted.yaml").write_text(yaml.safe_dump(stored))  # names the converted backbone
    plan = plan_finetune(
        "folder",
        videos,
        tmp_path / "converted.yaml",
        recipe="configs/finetune/tiny.yaml",
        overrides=[f"init_checkpoint={out}", "lr=1e-12", f"data.num_frames={T}"],
    )
    finetune(plan, tmp_path / "run", stop_after_steps=1, progress=False)
    start, _ = load_trainable_checkpoint(out)
    after_one_step, _ = load_trainable_checkpoint(tmp_path / "run" / "last.safetensors")
    assert set(start) == set(after_one_step)
    for key, value in start.items():
        torch.testing.assert_close(after_one_step[key], value, atol=1e-6, rtol=0)


def test_convert_names_what_the_config_must_change(tmp_path, capsys):
    adapters, _, offsets, _ = CASES["qkv"]
    torch.save({"state_dict": release_state(adapters)}, tmp_path / "release.pth")
    default_places = ["before_qkv", "after_proj", "before_fc1", "after_fc2"]
    config = model_yaml(tmp_path / "model.yaml", offsets, default_places, num_frames=8)
    args = [
        "convert",
        str(tmp_path / "release.pth"),
        "--config",
        str(config),
        "--out",
        str(tmp_path / "o.safetensors"),
    ]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "num_frames=4" in err and "adapter.places=[before_q, before_k, before_v, after_proj" in err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.backbone.safetensors").exists()
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3, 1)}}, tmp_path / "timm.pth")
    assert cli([*args[:1], str(tmp_path / "timm.pth"), *args[2:]]) == 2
    assert "not a ZeroI2V release checkpoint" in capsys.readouterr().err
