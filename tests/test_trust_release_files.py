"""ZeroI2V release files (issue 21 s6): nothing in a release checkpoint is resized or dropped silently, a
refused conversion leaves no file, and a converted model finetunes as the release trains (its configs:
``I3DHead(dropout_ratio=0.5)``, ``ln_post`` trained, ``data_preprocessor`` mean/std on 0-255 pixels).

The release-format tensors come from ``test_zeroi2v_release`` (its keys follow MCG-NJU/ZeroI2V).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_zeroi2v_release import CASES, IMG, PATCH, model_yaml, release_state
from timm.data import OPENAI_CLIP_MEAN

from amflow.cli import main as cli
from foundation.config import build_config
from stage1_extract.families.backbone import pixel_stats
from stage1_extract.methods.checkpoint import load_into, load_trainable_checkpoint
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, build_zeroi2v


def convert(tmp_path, state, capsys) -> tuple[int, str]:
    torch.save({"state_dict": state}, tmp_path / "release.pth")
    adapters, _, offsets, places = CASES["share"]
    config = model_yaml(tmp_path / "model.yaml", offsets, places)
    out = tmp_path / "o.safetensors"
    code = cli(["convert", str(tmp_path / "release.pth"), "--config", str(config), "--out", str(out)])
    return code, capsys.readouterr().err


def nothing_written(tmp_path) -> bool:
    return not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.backbone.safetensors").exists()


def share_state() -> dict[str, torch.Tensor]:
    return release_state(CASES["share"][0])


def test_a_position_embedding_for_another_grid_is_refused(tmp_path, capsys):
    state = share_state()
    side = IMG // PATCH + 1  # trained at 40 px: a 5x5 grid, the config makes 4x4
    state["backbone.positional_embedding"] = torch.randn(
        side * side + 1, state["backbone.conv1.weight"].shape[0]
    )
    code, err = convert(tmp_path, state, capsys)
    line = err.strip()
    assert code == 2 and len(line.splitlines()) == 1
    assert "positional_embedding: 26 tokens (5x5 patches + CLS)" in line and "4x4 grid" in line
    assert f"set backbone.img_size={side * PATCH}" in line and nothing_written(tmp_path)


@pytest.mark.parametrize(
    "key",
    [
        "backbone.transformer.resblocks.1.Extra_Adapter.D_fc1.weight",  # an adapter outside block 0
        "cls_head.fc_extra.weight",  # neither the backbone's nor the I3D head's
    ],
)
def test_unknown_names_are_refused_not_dropped(key, tmp_path, capsys):
    state = share_state()
    state[key] = torch.zeros(4, 4)
    code, err = convert(tmp_path, state, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and nothing_written(tmp_path)
    assert ("Extra_Adapter (blocks 1)" if "Extra" in key else "cls_head.fc_extra.weight") in err


def test_a_wrong_shaped_backbone_tensor_leaves_no_file(tmp_path, capsys):
    state = share_state()
    state["backbone.transformer.resblocks.1.attn.out_proj.weight"] = torch.zeros(64, 65)
    code, err = convert(tmp_path, state, capsys)
    assert code == 2 and "blocks.1.attn.proj.weight (64, 65) (expected (64, 64))" in err
    assert nothing_written(tmp_path)


def test_conversion_warns_of_no_random_backbone_and_finetunes_as_the_release(tmp_path, capsys, recwarn):
    state = share_state()
    code, err = convert(tmp_path, state, capsys)
    assert code == 0, err
    assert not [w for w in recwarn if "randomly initialised" in str(w.message)]
    out = tmp_path / "o.safetensors"
    trainable, stored = load_trainable_checkpoint(out)
    cfg = build_config(ZeroI2VConfig, stored)
    assert cfg.head_dropout == 0.5 and cfg.train_norm
    model = build_zeroi2v(cfg)
    load_into(model, trainable, out)
    # ln_post is trained: a trainable parameter, stored with the adapters, the release's values
    assert model.vit.norm.weight.requires_grad and model.vit.norm.bias.requires_grad
    assert torch.equal(trainable["vit.norm.weight"], state["backbone.ln_post.weight"])
    # the release's pixel mean/std exactly (configs' data_preprocessor, 0-255 pixels)
    mean, std = pixel_stats(model.vit)
    assert mean.flatten().tolist() == torch.tensor([m / 255 for m in (122.769, 116.74, 104.04)]).tolist()
    assert std.flatten().tolist() == torch.tensor([s / 255 for s in (68.493, 66.63, 70.321)]).tolist()
    assert mean.flatten().tolist() != torch.tensor(OPENAI_CLIP_MEAN).tolist()  # timm's rounded values
    # dropout 0.5 on the frame-averaged feature before the classifier, in training only
    feats = torch.randn(3, model.num_frames, model.vit.embed_dim)
    head = model.head.train()
    torch.manual_seed(1)
    trained = head(feats)
    torch.manual_seed(1)
    expected = F.linear(F.dropout(feats.mean(1), 0.5, training=True), head.fc.weight, head.fc.bias)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    assert torch.equal(head.eval()(feats), head.fc(feats.mean(1)))
