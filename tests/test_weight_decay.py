"""Both optimisers (end-to-end finetuning, stage-2 heads) decay the weight matrices and nothing else:
biases, norms, position / time embeddings, class tokens and adapter scales train at weight decay 0."""

import warnings

import pytest
import torch

from stage2_temporal.finetuning.models import build_model, load_model_config
from stage2_temporal.heads import TransformerHeadsConfig, build_classifier
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.optim import adamw
from stage2_temporal.training.train import make_optimiser
from store.layout import FlowBlock

# Named by hand from the modules' definitions (nn.MultiheadAttention: in_proj_bias), independently of
# the modules' no_weight_decay().
NO_DECAY_SUFFIXES = ("bias", ".scale", "pos_embed", "cls_token", "frame_embed", "time_embed")
NORMS = (".norm.", ".norm1.", ".norm2.")


def expected_no_decay(model):
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (name.endswith(NO_DECAY_SUFFIXES) or any(n in name for n in NORMS))
    }


def decay_by_name(model, optimizer):
    by_id = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert by_id[id(p)] not in out, f"{by_id[id(p)]} in two groups"
            out[by_id[id(p)]] = group["weight_decay"]
    return out


def check_groups(model, optimizer, weight_decay):
    got = decay_by_name(model, optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable  # every trainable parameter once, no frozen one
    no_decay = expected_no_decay(model)
    assert {n for n, wd in got.items() if wd == 0.0} == no_decay
    assert {n for n, wd in got.items() if wd == weight_decay} == trainable - no_decay
    return no_decay


@pytest.mark.parametrize("config", ["amflow", "zeroi2v"])
def test_finetune_optimiser_decays_only_weight_matrices(config):
    overrides = ["backbone.img_size=32", "backbone.timm_kwargs.depth=2"]
    if config == "amflow":
        overrides += ["bottleneck=16", "aligning_encoder=true", "heads.type=transformer", "heads.ff_dim=32"]
        overrides += ["heads.attn_heads=2", "heads.flow_embed=16", "heads.flow_grid=4", "num_frames=4"]
    cfg = load_model_config(f"configs/models/{config}_tiny.yaml", overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        model = build_model(cfg)
    no_decay = check_groups(model, adamw(model, lr=1e-3, weight_decay=0.05), 0.05)
    if config == "amflow":
        for name in (
            "vit.blocks.0.adapter_attn.scale",
            "vit.blocks.1.aligner.frame_embed",
            "classifier.temporal_heads.pos_embed",
            "classifier.temporal_heads.cls_token",
            "classifier.temporal_heads.norm1.0.weight",  # (groups, dim): 2-D, caught by no_weight_decay()
            "classifier.flow_encoder.norm.weight",
        ):
            assert name in no_decay, name
        assert "vit.blocks.0.adapter_attn.down.weight" not in no_decay
    else:
        assert "head.time_embed" in no_decay and "head.fc.bias" in no_decay
        assert "head.fc.weight" not in no_decay


def test_stage2_optimiser_decays_only_weight_matrices():
    heads = TransformerHeadsConfig(ff_dim=32, attn_heads=2, flow_maps=True, flow_embed=16)
    classifier = build_classifier(
        heads,
        num_classes=3,
        num_adapters=4,
        embed_dim=16,
        cls_dim=24,
        flow_blocks=[FlowBlock(1, 17, (4, 4), 1)] * 2,
    )
    optimiser, _ = make_optimiser(classifier, TrainConfig(heads=heads, weight_decay=0.1), steps_per_epoch=5)
    no_decay = check_groups(classifier, optimiser, 0.1)
    assert "temporal_heads.norm2.0.weight" in no_decay and "last_frame_head.bias" in no_decay
    assert "temporal_heads.qkv.0.weight" not in no_decay
    # weight_decay 0: nothing decays.
    optimiser, _ = make_optimiser(classifier, TrainConfig(heads=heads, weight_decay=0.0), steps_per_epoch=5)
    assert all(g["weight_decay"] == 0.0 for g in optimiser.param_groups)
    assert sum(len(g["params"]) for g in optimiser.param_groups) == len(decay_by_name(classifier, optimiser))
    assert torch.is_tensor(optimiser.param_groups[0]["params"][0])
