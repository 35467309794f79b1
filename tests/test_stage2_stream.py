"""Stage 2 out of core: streamed batches equal in-memory ones, and training from a streamed store reaches
the in-memory run's numbers (exactly when the batch order is the same)."""

import dataclasses

import numpy as np
import pytest
import torch

from stage2_temporal.heads import LSTMHeadsConfig
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.data import load_store
from stage2_temporal.training.evaluate import evaluate_store
from stage2_temporal.training.stream import (
    StreamedFeatures,
    open_features,
    parse_memory_budget,
    split_budget,
    store_selection,
)
from stage2_temporal.training.synthetic import synthetic_cache, write_store
from stage2_temporal.training.train import predict_proba, train_heads, train_heads_from_stores

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

FIELDS = {"model": "tiny"}


def cfg(**kw) -> TrainConfig:
    heads = LSTMHeadsConfig(hidden=16, layers=1, flow_embed=8, flow_hidden=8)
    base = dict(epochs=12, batch_size=32, lr=1e-2, warmup_epochs=1, patience=None, weight_decay=0.0)
    return TrainConfig(heads=heads, **{**base, **kw})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    train = synthetic_cache(192, seed=0)
    train.labels[5] = -1  # unlabelled: left out by both paths
    write_store(train, root / "train.zarr", FIELDS, shard_clips=16)
    write_store(synthetic_cache(64, seed=1, num_views=2), root / "val.zarr", FIELDS, shard_clips=16)
    return root


def test_streamed_batches_equal_in_memory_batches(stores):
    mem = load_store(stores / "val.zarr", adapters=["block2.attn", 0], with_flow=True, progress=False)
    sel = store_selection(stores / "val.zarr", ["block2.attn", 0], with_flow=True)
    streamed = StreamedFeatures(
        stores / "val.zarr", ["block2.attn", 0], with_flow=True, memory_budget=3 * sel.shard_bytes
    )
    assert streamed.cache_shards == 3 and streamed.window_shards == 1 and streamed.num_clips == 64
    rng = np.random.default_rng(0)
    clips, views = rng.permutation(64)[:40], rng.integers(0, 2, 40)  # spans all 4 shards
    a, b = mem.batch(clips, views, "cpu"), streamed.batch(clips, views, "cpu")
    for name in ("embeddings", "cls", "flow"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    flow_only = streamed.select([], ["block1"], with_flow=True)
    assert flow_only.batch(clips, views, "cpu").embeddings.shape == (40, 0, 4, 8)
    # A streamed epoch visits every clip once, holding at most 3 shards of the 4.
    order = streamed.epoch_order(torch.Generator().manual_seed(0)).numpy()
    assert sorted(order) == list(range(64))
    assert all(len(np.unique(streamed.shards[order[k : k + 16]])) == 1 for k in range(0, 64, 16))
    torch.manual_seed(0)
    from stage2_temporal.training.train import heads_info

    classifier = heads_info(mem.select(with_flow=True), cfg()).build()
    np.testing.assert_array_equal(predict_proba(classifier, mem, 24), predict_proba(classifier, streamed, 24))
    streamed.close()


def test_streamed_training_matches_in_memory(stores, tmp_path):
    mem_train = load_store(stores / "train.zarr", progress=False)
    mem_val = load_store(stores / "val.zarr", progress=False)
    m_mem = train_heads(mem_train, mem_val, cfg(), tmp_path / "mem", progress=False)
    # One window over every shard: the same order as in memory, so exactly the same numbers.
    same = StreamedFeatures(stores / "train.zarr", memory_budget=10**9)
    assert same.window_shards >= 12
    m_same = train_heads(
        same, StreamedFeatures(stores / "val.zarr"), cfg(), tmp_path / "same", progress=False
    )
    assert m_same["val"] == m_mem["val"] and m_same["final_train_loss"] == m_mem["final_train_loss"]
    # A real budget (2 of 12 shards held, windows of one shard): another order, the same accuracy here.
    m_stream = train_heads_from_stores(
        stores / "train.zarr",
        stores / "val.zarr",
        cfg(),
        tmp_path / "stream",
        progress=False,
        memory_budget=9000,
    )
    assert m_stream["num_train_clips"] == 191
    assert m_mem["val"]["mean_class_acc"] >= 0.9 and m_stream["val"]["mean_class_acc"] >= 0.9
    ev = evaluate_store(tmp_path / "stream", stores / "val.zarr", progress=False, memory_budget=5000)
    assert ev["mean_class_acc"] == pytest.approx(m_stream["val"]["mean_class_acc"])


def test_budget_parsing_and_choice(stores):
    assert parse_memory_budget("1GB") == 10**9 and parse_memory_budget("512MiB") == 2**29
    assert 0 < parse_memory_budget("0.25") < parse_memory_budget(None)
    with pytest.raises(ValueError, match="--memory-budget 'lots'"):
        parse_memory_budget("lots")
    sel = store_selection(stores / "train.zarr")
    # (3 adapters x 4 frames x 8 + 16 cls) float16 = 224 bytes a clip; 191 labelled clips
    assert sel.clip_bytes == 224 and sel.nbytes == 224 * 191
    assert isinstance(
        open_features(stores / "train.zarr", memory_budget=10**6, progress=False).embeddings, np.ndarray
    )
    assert isinstance(open_features(stores / "train.zarr", memory_budget=10**4), StreamedFeatures)
    val = store_selection(stores / "val.zarr")
    assert split_budget(sel, val, 10**6) == (10**6, 10**6)
    assert split_budget(sel, val, 40000) == (30000, 10000)  # the validation store takes > 1/4: both streamed
    small = dataclasses.replace(val, num_clips=8)  # a quarter or less: held whole, the rest for training
    assert split_budget(sel, small, 40000) == (40000 - small.nbytes, small.nbytes)


def test_sweep_workers_open_the_stores_and_stream_them(stores, tmp_path):
    from stage2_temporal.sweeps.sweep import StoreRef, SweepGrid, open_refs, run_sweep

    train, val = (StoreRef(str(stores / n), memory_budget=9000) for n in ("train.zarr", "val.zarr"))
    grid = SweepGrid(fixed={"epochs": 2, "heads.hidden": 8, "patience": None}, grid={"lr": [0.01, 0.003]})
    result = run_sweep(train, val, grid, tmp_path, workers=0, progress=False)
    assert result.trained == 2 and not result.failed
    opened = open_refs(train, val)
    assert isinstance(opened[0], StreamedFeatures) and opened[0].num_clips == 191
    assert open_refs(train, val) is opened  # opened once per worker process, kept for its next runs


def test_features_held_as_device_tensors_give_the_same_batches(stores):
    from stage2_temporal.training.stream import features_as_tensors, hold_on_device

    mem = load_store(stores / "val.zarr", with_flow=True, progress=False)
    held = features_as_tensors(mem, "cpu").select(["block1.mlp"], ["block2"])  # the CUDA path's logic, on CPU
    assert isinstance(held.embeddings, torch.Tensor) and held.embeddings.dtype == torch.float16
    ref = mem.select(["block1.mlp"], ["block2"])
    clips, views = np.array([3, 60, 17, 17]), np.array([1, 0, 0, 1])
    a, b = ref.batch(clips, views, "cpu"), held.batch(clips, views, "cpu")
    for name in ("embeddings", "cls", "flow"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert hold_on_device(mem, "cpu") is mem  # only CUDA devices hold features


def test_shard_cache_reuses_only_writable_arrays():
    # A dropped shard's arrays are handed to the next read only when they can be written into; a shard
    # read from object storage is a read-only view of its GET's buffer and is let go instead.
    from store.shards import ShardCache

    spares = []

    def read(shard, spare):
        spares.append(spare)
        array = np.zeros(4)
        array.flags.writeable = shard == 2
        return {"x": array}

    cache = ShardCache(read, capacity=1, threads=1)
    cache.plan(np.array([1, 2, 3]), np.array([1, 1, 1]))
    for shard in (1, 2, 3):
        cache.get(shard)
        cache.used(shard, 1)
    cache.close()
    assert spares[0] is None and spares[1] is None  # shard 1's read-only array is not reused
    assert spares[2] is not None and spares[2]["x"].flags.writeable  # shard 2's is, by shard 3's read
