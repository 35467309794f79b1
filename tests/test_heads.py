"""Each grouped head type against its PyTorch reference, with copied weights; head configs by type."""

import pytest
import torch
from torch import nn

from foundation.config import ConfigError, build_config, load_config
from stage2_temporal.heads import (
    HEAD_TYPES,
    LSTMHeads,
    LSTMHeadsConfig,
    TCNHeads,
    TCNHeadsConfig,
    TransformerHeads,
    TransformerHeadsConfig,
    drop_ignored_head_keys,
)
from stage2_temporal.training.config import TrainConfig

G, B, T, IN, H, C = 3, 2, 5, 6, 8, 4


def test_lstm_heads_equal_nn_lstm():
    torch.manual_seed(0)
    heads = LSTMHeads(G, IN, H, layers=2, num_classes=C)
    x = torch.randn(B, G, T, IN)
    out = heads(x)
    for g in range(G):
        ref = nn.LSTM(IN, H, num_layers=2, batch_first=True)
        with torch.no_grad():
            for layer in range(2):
                # GroupedLinear holds (in, out); nn.LSTM's gates are (4H, in) in the same i, f, g, o order.
                getattr(ref, f"weight_ih_l{layer}").copy_(heads.input_proj[layer].weight[g].T)
                getattr(ref, f"weight_hh_l{layer}").copy_(heads.recurrent[layer].weight[g].T)
                getattr(ref, f"bias_ih_l{layer}").copy_(heads.input_proj[layer].bias[g])
                getattr(ref, f"bias_hh_l{layer}").copy_(heads.recurrent[layer].bias[g])
        _, (h_n, _) = ref(x[:, g])
        logits = h_n[-1] @ heads.classifier.weight[g] + heads.classifier.bias[g]
        torch.testing.assert_close(out[:, g], logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in heads.input_proj.parameters()) + sum(
        p.numel() for p in heads.recurrent.parameters()
    ) == G * sum(p.numel() for p in nn.LSTM(IN, H, num_layers=2).parameters())


def test_tcn_heads_equal_a_conv1d_stack():
    torch.manual_seed(0)
    kernel, layers = 3, 2
    heads = TCNHeads(G, IN, H, layers, C, kernel=kernel)
    x = torch.randn(B, G, T, IN)
    out = heads(x)
    for g in range(G):
        y = (x[:, g] @ heads.input_proj.weight[g] + heads.input_proj.bias[g]).transpose(1, 2)  # (B, H, T)
        for layer in range(layers):
            dilation = 2**layer
            conv = nn.Conv1d(H, H, kernel, dilation=dilation, padding="same")
            w = heads.convs[layer].weight[g]  # (kernel*H, H): tap j's input channels at rows j*H..(j+1)*H
            with torch.no_grad():
                conv.weight.copy_(w.reshape(kernel, H, H).permute(2, 1, 0))
                conv.bias.copy_(heads.convs[layer].bias[g])
            y = y + torch.relu(conv(y))
        logits = y.mean(dim=2) @ heads.classifier.weight[g] + heads.classifier.bias[g]
        torch.testing.assert_close(out[:, g], logits, rtol=1e-5, atol=1e-5)


def test_transformer_heads_equal_nn_transformer_encoder_layer():
    torch.manual_seed(0)
    dim, attn_heads, ff = 8, 2, 16
    heads = TransformerHeads(G, dim, layers=1, num_classes=C, attn_heads=attn_heads, ff_dim=ff)
    x = torch.randn(B, G, T, dim)
    out = heads(x)
    for g in range(G):
        ref = nn.TransformerEncoderLayer(
            dim, attn_heads, ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        with torch.no_grad():
            ref.self_attn.in_proj_weight.copy_(heads.qkv[0].weight[g].T)
            ref.self_attn.in_proj_bias.copy_(heads.qkv[0].bias[g])
            ref.self_attn.out_proj.weight.copy_(heads.proj[0].weight[g].T)
            ref.self_attn.out_proj.bias.copy_(heads.proj[0].bias[g])
            ref.linear1.weight.copy_(heads.fc1[0].weight[g].T)
            ref.linear1.bias.copy_(heads.fc1[0].bias[g])
            ref.linear2.weight.copy_(heads.fc2[0].weight[g].T)
            ref.linear2.bias.copy_(heads.fc2[0].bias[g])
            for norm, mine in ((ref.norm1, heads.norm1[0]), (ref.norm2, heads.norm2[0])):
                norm.weight.copy_(mine.weight[g])
                norm.bias.copy_(mine.bias[g])
        seq = torch.cat([heads.cls_token[g].expand(B, 1, dim), x[:, g]], dim=1) + heads.pos_embed[g, : T + 1]
        encoded = ref.eval()(seq)[:, 0]
        cls = nn.functional.layer_norm(encoded, (dim,), heads.norm.weight[g], heads.norm.bias[g])
        logits = cls @ heads.classifier.weight[g] + heads.classifier.bias[g]
        torch.testing.assert_close(out[:, g], logits, rtol=1e-5, atol=1e-5)


def test_head_config_is_chosen_by_type_and_rejects_other_types_keys():
    cfg = build_config(TrainConfig, {"heads": {"type": "tcn", "hidden": 32, "kernel": 5}})
    assert isinstance(cfg.heads, TCNHeadsConfig) and cfg.heads.kernel == 5
    assert isinstance(build_config(TrainConfig, {}).heads, LSTMHeadsConfig)  # the default type
    assert set(HEAD_TYPES) == {"lstm", "tcn", "transformer"}
    with pytest.raises(ConfigError, match="unknown key 'heads.hidden'"):
        build_config(TrainConfig, {"heads": {"type": "transformer", "hidden": 32}})
    with pytest.raises(ConfigError, match=r"heads.type.*expected one of"):
        build_config(TrainConfig, {"heads": {"type": "gru"}})
    cfg = load_config(TrainConfig, "configs/heads/transformer.yaml", ["heads.ff_dim=64"])
    assert isinstance(cfg.heads, TransformerHeadsConfig) and cfg.heads.ff_dim == 64


def test_configs_written_before_per_type_configs_still_read():
    old = {  # a transformer run's heads as the flat config wrote them: every type's keys
        "type": "transformer",
        "hidden": 768,
        "layers": 1,
        "kernel": 3,
        "attn_heads": 2,
        "ff_dim": 16,
        "max_frames": 64,
        "dropout": 0.0,
        "flow_maps": False,
        "last_frame": True,
        "combine": "mean",
    }
    cfg = build_config(TrainConfig, drop_ignored_head_keys({"heads": old}))
    assert isinstance(cfg.heads, TransformerHeadsConfig) and cfg.heads.attn_heads == 2


def test_heads_saved_with_the_flat_config_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    from stage2_temporal.training.run_dir import METADATA_KEY, HeadsInfo, load_heads

    info = HeadsInfo(TCNHeadsConfig(hidden=8, layers=1), 3, ["block1.attn"], embed_dim=4, cls_dim=6)
    trained = info.build()
    meta = json.loads(json.dumps({**info.__dict__, "heads": {**info.heads.__dict__}}))
    # what the flat HeadsConfig wrote: every head type's keys, whatever the type
    meta["heads"].update(attn_heads=8, ff_dim=1280, max_frames=64)
    path = tmp_path / "heads.safetensors"
    save_file(dict(trained.state_dict()), str(path), metadata={METADATA_KEY: json.dumps(meta)})
    loaded, read = load_heads(path)
    assert read.heads == info.heads
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_an_override_that_changes_the_head_type_drops_the_old_types_keys():
    from stage2_temporal.finetuning.models import load_model_config

    cfg = load_config(TrainConfig, "configs/heads/lstm.yaml", ["heads.type=transformer", "heads.ff_dim=64"])
    assert isinstance(cfg.heads, TransformerHeadsConfig) and cfg.heads.ff_dim == 64
    assert cfg.heads.layers == 3  # keys both types have keep the file's value
    model = load_model_config("configs/models/amflow_tiny.yaml", ["heads.type=tcn", "heads.kernel=5"])
    assert isinstance(model.heads, TCNHeadsConfig) and model.heads.hidden == 64 and model.heads.kernel == 5
    with pytest.raises(ConfigError, match="unknown key 'heads.hidden'"):  # said by the user: an error
        load_config(TrainConfig, "configs/heads/lstm.yaml", ["heads.type=transformer", "heads.hidden=8"])
