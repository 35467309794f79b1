"""Training heads from the cache: learns temporal order, restores the best epoch, matches the end-to-end
model's logits, and the train-heads / evaluate commands on stores written through the store's writer."""

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amflow.commands import evaluate as evaluate_command
from amflow.commands import train_heads as train_heads_command
from foundation.config import ConfigError, load_config
from stage1_extract.features.am_flow import AMFlowFeatures
from stage1_extract.methods.model_config import BackboneConfig
from stage2_temporal.finetuning.models import AMFlowModelConfig as AMFlowConfig
from stage2_temporal.finetuning.models import build_amflow
from stage2_temporal.heads import LSTMHeadsConfig, TCNHeadsConfig
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.data import CachedFeatures, load_store
from stage2_temporal.training.evaluate import evaluate_heads
from stage2_temporal.training.run_dir import load_heads, load_heads_into, read_metrics
from stage2_temporal.training.schedule import cosine_with_warmup
from stage2_temporal.training.synthetic import synthetic_cache, write_store
from stage2_temporal.training.train import predict_logits, predict_proba, train_heads

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

SMALL = LSTMHeadsConfig(hidden=16, layers=1, flow_embed=8, flow_hidden=8)


def small_cfg(**kw) -> TrainConfig:
    heads = kw.pop("heads", SMALL)
    base = dict(epochs=10, batch_size=32, lr=1e-2, warmup_epochs=1, patience=None, weight_decay=0.0)
    return TrainConfig(heads=heads, **{**base, **kw})


@pytest.fixture(scope="module")
def caches():
    return synthetic_cache(256, seed=0), synthetic_cache(96, seed=1, num_views=2)


def test_heads_learn_temporal_order(caches, tmp_path):
    train, val = caches
    metrics = train_heads(train, val, small_cfg(), tmp_path, progress=False)
    curve = list(csv.DictReader((tmp_path / "curve.csv").open()))
    losses = [float(r["train_loss"]) for r in curve]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["val"]["mean_class_acc"] >= 0.9  # chance is 0.25; the mean over time carries nothing
    written = {p.name for p in tmp_path.iterdir()}
    assert written >= {"config.yaml", "fingerprint.json", "heads.safetensors", "curve.csv", "curve.png"}
    assert written >= {"confusion_val.csv", "confusion_val.png", "metrics.json"}
    assert load_config(TrainConfig, tmp_path / "config.yaml") == small_cfg()
    # The saved heads reproduce the reported metrics, views averaged.
    again = evaluate_heads(tmp_path, val)
    assert again["mean_class_acc"] == pytest.approx(metrics["val"]["mean_class_acc"])
    assert again["top1"] == pytest.approx(metrics["val"]["top1"])


def test_mean_over_time_alone_stays_at_chance(caches, tmp_path):
    """Control: TCN heads with kernel 1 only see frames one at a time, then average: order is lost."""
    train, val = caches
    heads = TCNHeadsConfig(hidden=16, layers=1, kernel=1)
    metrics = train_heads(train, val, small_cfg(heads=heads), tmp_path, progress=False)
    assert metrics["val"]["mean_class_acc"] < 0.45


def test_views_are_averaged_as_softmax_probabilities(caches):
    _, val = caches
    torch.manual_seed(0)
    from stage2_temporal.training.train import heads_info

    classifier = heads_info(val.select(with_flow=False), small_cfg()).build()
    probs = predict_proba(classifier, val.select(with_flow=False), batch_size=40)
    per_view = [
        torch.from_numpy(predict_logits(classifier, val.select(with_flow=False), view=v)).softmax(-1)
        for v in range(2)
    ]
    np.testing.assert_allclose(probs, ((per_view[0] + per_view[1]) / 2).numpy(), rtol=1e-5, atol=1e-7)


def test_early_stopping_keeps_the_best_epoch(caches, tmp_path):
    train, val = caches
    metrics = train_heads(train, val, small_cfg(epochs=40, patience=2, lr=3e-2), tmp_path, progress=False)
    assert metrics["stopped_early"] and metrics["epochs_run"] < 40
    curve = list(csv.DictReader((tmp_path / "curve.csv").open()))
    best = curve[metrics["best_epoch"] - 1]
    assert metrics["val"]["mean_class_acc"] == pytest.approx(float(best["val_mean_class_acc"]))
    assert max(float(r["val_mean_class_acc"]) for r in curve) == pytest.approx(
        metrics["val"]["mean_class_acc"]
    )


def test_flow_map_heads_alone_learn_with_block_selection(caches, tmp_path):
    train, val = caches
    heads = LSTMHeadsConfig(
        hidden=16, layers=1, flow_maps=True, flow_embed=8, flow_hidden=8, last_frame=False
    )
    cfg = small_cfg(heads=heads, adapters=[], flow_blocks=["block2"])
    metrics = train_heads(train, val, cfg, tmp_path, progress=False)
    assert metrics["num_branches"] == 1
    assert metrics["val"]["mean_class_acc"] >= 0.9
    _, info = load_heads(tmp_path)
    assert info.adapter_names == [] and info.flow_block_names == ["block2"]


def test_voting_and_selection_by_position(caches, tmp_path):
    train, val = caches
    heads = TCNHeadsConfig(hidden=16, layers=2, combine="voting")
    metrics = train_heads(train, val, small_cfg(heads=heads, adapters=[0, 2]), tmp_path, progress=False)
    classifier, info = load_heads(tmp_path)
    assert info.adapter_names == ["block1.attn", "block2.attn"] and classifier.voting is not None
    assert metrics["num_branches"] == 3
    with pytest.raises(
        ValueError, match=r"adapters: no 'block9.mlp' in the cache; available: \['block1.attn'"
    ):
        train_heads(train, val, small_cfg(adapters=["block9.mlp"]), tmp_path / "bad", progress=False)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    f = cosine_with_warmup(total_steps=10, warmup_steps=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.0)


def test_shipped_configs_load():
    for name in ("lstm", "tcn", "transformer", "tiny"):
        cfg = load_config(TrainConfig, f"configs/heads/{name}.yaml")
        raw = yaml.safe_load(Path(f"configs/heads/{name}.yaml").read_text())
        assert cfg.heads.type == raw["heads"]["type"] and cfg.lr == raw["lr"]
    with pytest.raises(ConfigError, match="heads.hidden"):
        load_config(TrainConfig, "configs/heads/tiny.yaml", ["heads.hidden=0"])
    with pytest.raises(ConfigError, match="'adapters'"):
        load_config(TrainConfig, "configs/heads/tiny.yaml", ["adapters=some"])


def tiny_model(seed=0):
    heads = LSTMHeadsConfig(hidden=16, layers=1, flow_maps=True, flow_embed=16, flow_hidden=16)
    cfg = AMFlowConfig(
        backbone=BackboneConfig(name="vit_tiny_patch16_224", img_size=32, timm_kwargs={"depth": 2}),
        num_frames=4,
        num_classes=3,
        heads=heads,
        seed=seed,
    )
    return build_amflow(cfg).eval(), heads


def test_heads_from_cache_equal_heads_inside_end_to_end_model(tmp_path):
    model, heads = tiny_model()
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(12, 4, 3, 32, 32, generator=g)
    labels = torch.arange(12) % 3
    with torch.no_grad():
        features = model.extract(videos)
    cache = CachedFeatures.from_clip_features(
        features,
        labels,
        num_classes=3,
        adapter_names=model.adapter_names,
        flow_block_names=model.flow_block_names,
        flow_geometry=AMFlowFeatures.layout_of(model).flow_geometry,
        source="<extract>",
    )
    cfg = small_cfg(heads=heads, epochs=2)
    train_heads(cache, cache, cfg, tmp_path / "run", progress=False)

    # Through a store written by the store's writer (float32, so no rounding), as stage 1 writes one.
    write_store(cache, tmp_path / "train.zarr", {"model": "tiny"}, dtype="float32")
    from_store = load_store(tmp_path / "train.zarr", with_flow=True, progress=False)
    assert from_store.adapter_names == model.adapter_names
    assert [b.grid for b in from_store.flow_geometry] == [model.patch_grid] * len(model.flow_block_names)
    cached_logits = predict_logits(load_heads(tmp_path / "run")[0], from_store)

    load_heads_into(model.classifier, tmp_path / "run")
    with torch.no_grad():
        end_to_end = model(videos)
    assert not torch.allclose(end_to_end, build_amflow(model.cfg).eval()(videos))  # the heads were trained
    np.testing.assert_allclose(cached_logits, end_to_end.numpy(), rtol=1e-4, atol=1e-5)

    # float16 store: the same logits up to the rounding of the features.
    write_store(cache, tmp_path / "half.zarr", {"model": "tiny"}, dtype="float16")
    half = predict_logits(
        model.classifier, load_store(tmp_path / "half.zarr", with_flow=True, progress=False)
    )
    np.testing.assert_allclose(half, end_to_end.numpy(), atol=2e-2)


def command(module, argv):
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_heads_and_evaluate_commands_on_stores(tmp_path, capsys):
    fields = {"model": {"name": "tiny", "blocks": "all"}, "dtype": "float16"}
    write_store(synthetic_cache(128, seed=0), tmp_path / "train.zarr", fields, shard_clips=32)
    write_store(synthetic_cache(64, seed=1, num_views=2), tmp_path / "val.zarr", fields)
    write_store(synthetic_cache(64, seed=2, num_views=2), tmp_path / "test.zarr", fields)
    other = {"model": {"name": "tiny", "blocks": [1]}, "dtype": "float16"}
    write_store(synthetic_cache(64, seed=3), tmp_path / "other.zarr", other)
    run = tmp_path / "run"
    overrides = ["heads.hidden=16", "epochs=15", "lr=0.01", "heads.flow_embed=8", "heads.flow_hidden=8"]

    def train(val_store, *flags):
        argv = [
            "train-heads",
            "--store",
            str(tmp_path / "train.zarr"),
            "--val-store",
            str(tmp_path / val_store),
        ]
        argv += ["--config", "configs/heads/tiny.yaml", "--out", str(run), "--quiet", *flags, *overrides]
        return command(train_heads_command, argv)

    with pytest.raises(ValueError, match=r"model.blocks: stored \[1\], expected \"all\""):
        train("other.zarr")
    assert not (run / "metrics.json").exists()
    with pytest.warns(UserWarning, match="model.blocks"):
        train("other.zarr", "--force")
    with pytest.raises(ValueError, match="already holds a finished run"):
        train("val.zarr")
    assert train("val.zarr", "--overwrite") == 0
    out = capsys.readouterr().out
    assert "mean class acc" in out and "order3" in out
    assert json.loads((run / "fingerprint.json").read_text())["fingerprint_fields"] == fields
    assert read_metrics(run)["val"]["mean_class_acc"] >= 0.8

    assert (
        command(evaluate_command, ["evaluate", "--store", str(tmp_path / "test.zarr"), "--run", str(run)])
        == 0
    )
    result = json.loads((run / "eval_test.json").read_text())
    assert result["num_clips"] == 64 and result["mean_class_acc"] >= 0.8
    assert (run / "confusion_test.png").is_file() and "top-5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="model.blocks"):
        command(evaluate_command, ["evaluate", "--store", str(tmp_path / "other.zarr"), "--run", str(run)])


def test_load_store_reads_only_the_selection(tmp_path):
    cache = synthetic_cache(40, seed=5, num_views=2)
    cache.labels[3] = -1  # an unlabelled clip: left out
    kept = np.arange(40) != 3
    write_store(cache, tmp_path / "s.zarr", {"model": "tiny"}, shard_clips=16)
    flow_only = load_store(
        tmp_path / "s.zarr", adapters=[], flow_blocks=["block2"], with_flow=True, progress=False
    )
    assert flow_only.embeddings.shape == (39, 2, 0, 4, 8) and flow_only.adapter_names == []
    assert flow_only.flow.shape == (39, 2, 1, 4, 3, 5) and flow_only.flow_block_names == ["block2"]
    np.testing.assert_array_equal(flow_only.flow, cache.flow[kept, :, 1:])
    some = load_store(tmp_path / "s.zarr", adapters=["block2.attn", 0], progress=False)
    np.testing.assert_array_equal(some.embeddings, cache.embeddings[kept][:, :, [2, 0]])
    np.testing.assert_array_equal(some.labels, cache.labels[kept])
    assert some.flow is None and some.class_names == cache.class_names and some.num_classes == 4
    write_store(synthetic_cache(8, seed=6, flow_blocks=0), tmp_path / "noflow.zarr", {"model": "tiny"})
    with pytest.raises(ValueError, match="noflow.zarr: AM-flow maps are asked for but the store holds none"):
        load_store(tmp_path / "noflow.zarr", with_flow=True, progress=False)
