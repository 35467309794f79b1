"""Per-block store shapes: a schema-1 store still reads with the same numbers, a fresh ViT extraction writes
the same chunk bytes as the code before, and flow blocks of different shapes round-trip through stage 2."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1_extract.extraction.block_maps import pack_block_maps
from stage1_extract.extraction.extract import ExtractOptions, plan_extraction, run_extraction
from stage2_temporal.heads import LSTMHeadsConfig, build_classifier
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.data import CachedFeatures, load_store
from stage2_temporal.training.run_dir import load_heads
from stage2_temporal.training.stream import StreamedFeatures
from stage2_temporal.training.synthetic import write_store
from stage2_temporal.training.train import predict_logits, train_heads
from store import FeatureStore, FlowBlock, export_h5, import_h5, load_arrays, verify_store

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

LEGACY = Path(__file__).parent / "data" / "legacy_vit"
SMALL = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]
HIERARCHICAL = [FlowBlock(1, 17, (4, 4), 1, heads=1, width=8), FlowBlock(2, 4, (2, 2), 0, heads=2, width=16)]


def raw(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A raw chunk file as float16 values, read without the store's code."""
    return np.frombuffer(path.read_bytes(), dtype=np.float16).reshape(shape)


def test_a_schema1_store_reads_with_its_recorded_geometry_and_numbers():
    store = FeatureStore.open(LEGACY / "store.zarr")
    assert store.attrs["schema_version"] == 1
    assert store.flow_geometry == [FlowBlock(3, 17, (4, 4), 1)] * 2
    assert store.class_names == ["left", "right"] and store.num_classes == 2
    arrays = load_arrays(store, with_flow=True, progress=False)
    flow = np.concatenate(
        [raw(LEGACY / f"store.zarr/flow/c.{s}.0.0.0.0.0", (2, 2, 1, 4, 3, 17)) for s in (0, 1)]
    )
    emb = np.concatenate(
        [raw(LEGACY / f"store.zarr/embeddings/c.{s}.0.0.0.0", (2, 4, 1, 4, 64)) for s in (0, 1)]
    )
    np.testing.assert_array_equal(arrays.flow, flow)
    np.testing.assert_array_equal(arrays.embeddings, emb)
    cache = load_store(LEGACY / "store.zarr", with_flow=True, progress=False)
    assert [b.grid for b in cache.flow_geometry] == [(4, 4)] * 2 and cache.class_names == ["left", "right"]
    np.testing.assert_array_equal(cache.flow, flow.swapaxes(1, 2))


def test_a_fresh_vit_extraction_writes_the_chunk_bytes_of_the_code_before(tmp_path):
    opts = ExtractOptions(
        batch_size=2, decode_workers=0, device="cpu", store_flow=True, shard_clips=2, threads=1
    )
    plan, store = plan_extraction(
        "folder",
        LEGACY / "videos",
        "train",
        "configs/models/amflow_tiny.yaml",
        tmp_path / "new.zarr",
        overrides=SMALL,
        options=opts,
    )
    run_extraction(plan, store)
    new = FeatureStore.open(tmp_path / "new.zarr")
    assert new.attrs["schema_version"] == 2
    assert new.flow_geometry == [FlowBlock(3, 17, (4, 4), 1, heads=3, width=192)] * 2
    for name in ("embeddings", "flow", "cls"):
        for shard in (0, 1):
            old = FeatureStore.open(LEGACY / "store.zarr").chunk_file(name, shard)
            assert new.chunk_file(name, shard).read_bytes() == old.read_bytes(), (name, shard)
    old_meta = json.loads((LEGACY / "store.zarr" / "flow" / "zarr.json").read_text())
    new_meta = json.loads((tmp_path / "new.zarr" / "flow" / "zarr.json").read_text())
    assert new_meta == old_meta  # the same array: shape, chunks, dimension names


def packed_cache(clips: int = 24, views: int = 2, frames: int = 3) -> CachedFeatures:
    """Flow blocks of different heads and grids (as a hierarchical backbone's): the class is the corner
    where the first block's map is high (the second block's map is noise)."""
    rng = np.random.default_rng(0)
    labels = np.arange(clips) % 2
    first = rng.random((clips, views, frames, 1, 17)).astype(np.float32)
    first[labels == 1, ..., 1] += 3.0  # token 1 = patch (0, 0) after the CLS
    second = rng.random((clips, views, frames, 2, 4)).astype(np.float32)
    flow = np.concatenate(
        [first.reshape(clips, views, frames, -1), second.reshape(clips, views, frames, -1)], -1
    )
    return CachedFeatures(
        embeddings=rng.normal(size=(clips, views, 1, frames, 4)).astype(np.float32),
        cls=rng.normal(size=(clips, views, 8)).astype(np.float32),
        flow=flow,
        labels=labels,
        num_classes=2,
        adapter_names=["block1.attn"],
        flow_block_names=["stage1", "stage2"],
        flow_geometry=HIERARCHICAL,
        class_names=["still", "corner"],
    )


def test_flow_blocks_of_different_shapes_round_trip_through_the_store(tmp_path):
    cache = packed_cache()
    path = write_store(cache, tmp_path / "h.zarr", {"model": "hierarchical"}, dtype="float32", shard_clips=8)
    store = FeatureStore.open(path)
    assert store.layout.flow_packed and store.array("flow").shape == (24, 2, 3, 17 + 8)
    assert store.flow_geometry == HIERARCHICAL
    read = load_store(path, with_flow=True, progress=False)
    np.testing.assert_array_equal(read.flow, cache.flow)
    second = load_store(path, flow_blocks=["stage2"], with_flow=True, progress=False)
    np.testing.assert_array_equal(second.flow, cache.flow[..., 17:])
    assert second.flow_geometry == HIERARCHICAL[1:]
    streamed = StreamedFeatures(path, flow_blocks=["stage2"], with_flow=True, memory_budget=2**20)
    batch = streamed.batch(np.array([3, 10]), np.array([1, 0]), "cpu")
    np.testing.assert_array_equal(batch.flow.numpy(), cache.flow[[3, 10], [1, 0], :, 17:])
    streamed.close()
    assert verify_store(path, progress=False) == []
    back = import_h5(
        export_h5(path, tmp_path / "h.h5", progress=False), tmp_path / "back.zarr", progress=False
    )
    assert back.flow_geometry == HIERARCHICAL
    np.testing.assert_array_equal(load_arrays(back, with_flow=True, progress=False).flow, cache.flow)


def test_flow_map_heads_pool_each_block_on_its_own_grid():
    cache = packed_cache(clips=2, views=1)
    heads = LSTMHeadsConfig(hidden=8, layers=1, flow_maps=True, flow_grid=2, flow_embed=6, flow_hidden=8)
    classifier = build_classifier(heads, 2, 1, 4, 8, flow_blocks=HIERARCHICAL)
    maps = torch.from_numpy(cache.flow[:, 0])  # (B, T, M)
    # by hand: per block, heads summed, prefix dropped, each 2x2 quadrant's mean (block 2: its own 2x2)
    first = maps[..., :17].reshape(2, 3, 1, 17)[..., 1:].sum(2).reshape(2, 3, 4, 4)
    pooled_first = first.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(2, 3, 4)
    pooled_second = maps[..., 17:].reshape(2, 3, 2, 4).sum(2)
    enc = classifier.flow_encoder
    x = torch.stack([pooled_first, pooled_second], dim=1)
    expected = enc.fc2(F.relu(enc.fc1(enc.norm(x))))
    torch.testing.assert_close(enc(maps), expected)


def test_heads_learn_from_packed_flow_maps(tmp_path):
    cache = packed_cache()
    heads = LSTMHeadsConfig(
        hidden=8, layers=1, flow_maps=True, flow_grid=2, flow_embed=8, flow_hidden=8, last_frame=False
    )
    cfg = TrainConfig(heads=heads, adapters=[], epochs=15, batch_size=8, lr=0.01, seed=0)
    train_heads(cache, cache, cfg, tmp_path / "run", progress=False)
    classifier, info = load_heads(tmp_path / "run")
    assert [b.grid for b in info.flow_blocks()] == [(4, 4), (2, 2)]
    logits = predict_logits(classifier, cache.select([], with_flow=True))
    assert (logits.argmax(-1) == cache.labels).mean() >= 0.9  # chance: 0.5


def test_stage1_packs_block_maps_of_different_shapes_as_the_heads_unpack_them():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, b.channels, b.tokens, generator=g) for b in HIERARCHICAL]  # (B, T, h_b, N_b)
    packed = pack_block_maps(maps)
    assert packed.shape == (2, 3, 17 + 8)
    heads = LSTMHeadsConfig(hidden=8, layers=1, flow_maps=True, flow_grid=2, flow_embed=6, flow_hidden=8)
    encoder = build_classifier(heads, 2, 1, 4, 8, flow_blocks=HIERARCHICAL).flow_encoder
    for m, unpacked in zip(maps, encoder.block_maps(packed), strict=True):
        assert torch.equal(unpacked, m)
    torch.testing.assert_close(encoder(packed), encoder(maps))  # the list ClipFeatures may carry
    stacked = torch.randn(2, 2, 3, 3, 17, generator=g)  # (B, F, T, h, N): one shape, kept as it is
    assert pack_block_maps(stacked) is stacked


@pytest.mark.parametrize("source", ["--model", "--run"])
def test_a_heads_run_and_export_made_before_predict_the_same(source, capsys):
    """``heads_run`` / ``heads_export.safetensors``: a train-heads run (flow-map heads) on the schema-1
    store's clips and its export, made by the code before; their predictions were recorded then."""
    from amflow.cli import main

    path = LEGACY / ("heads_export.safetensors" if source == "--model" else "heads_run")
    capsys.readouterr()
    argv = ["predict", str(LEGACY / "videos"), source, str(path), "--json", "--decode-workers", "0"]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {(p["video"].split("/videos/")[1], t["label"]): t["prob"] for p in lines for t in p["top5"]}
    recorded = json.loads((LEGACY / "heads_predictions.json").read_text())
    expected = {(video, label): prob for video, probs in recorded.items() for label, prob in probs.items()}
    assert got == pytest.approx(expected, abs=1e-6)
