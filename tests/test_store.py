"""Feature store: round trips, fingerprints, resume rules, writer checks, readers, info/verify and the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from amflow.cli import main
from store import (
    STATUS_DONE,
    STATUS_FAILED,
    BackgroundCommits,
    FeatureDataset,
    FeatureStore,
    FingerprintMismatch,
    FlowBlock,
    NotAStoreError,
    ReadOnlyStoreError,
    ShardBusyError,
    ShardOrderedSampler,
    StoreError,
    check_fingerprint,
    compute_fingerprint,
    export_h5,
    import_h5,
    load_arrays,
    store_info,
    verify_store,
)
from store.budget import clip_bytes, store_selection
from store.shards import read_shard_arrays

A, V, T, R, D = 3, 2, 4, 8, 6
FLOW = (2, 3, 5)  # blocks, heads, tokens
N = 10
SHARD = 4  # shards of 4, 4, 2 clips
FIELDS = {"backbone": "vit_tiny_patch16_224", "weights_sha256": "ab12", "sampling": {"frames": T, "views": V}}
FAILED = {2: ("DecodeError", "moov atom not found"), 7: ("TooShort", "3 frames < 4")}


def clip_data(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {
        "embeddings": rng.standard_normal((A, V, T, R)).astype(np.float32) * 4,
        "cls": rng.standard_normal((V, D)).astype(np.float32),
        "flow": rng.random((FLOW[0], V, T, FLOW[1], FLOW[2])).astype(np.float32),
    }


def make_store(path: Path, **overrides) -> FeatureStore:
    kwargs = dict(
        clip_ids=[f"Cook.Cut_p{i:02d}_r00_v01_c03.mp4" for i in range(N)],
        labels=[i % 3 if i != 4 else -1 for i in range(N)],
        num_adapters=A,
        num_views=V,
        num_frames=T,
        embed_dim=R,
        cls_dim=D,
        flow_blocks=[FlowBlock(FLOW[1], FLOW[2])] * FLOW[0],
        shard_clips=SHARD,
        provenance={"dataset": "smarthome", "protocol": "CS", "split": "train", "config": {"lr": 0.1}},
        fingerprint_fields=FIELDS,
        adapter_names=["b1.attn", "b1.mlp", "b2.attn"],
        flow_block_names=["block1", "block2"],
    )
    kwargs.update(overrides)
    return FeatureStore.create(path, **kwargs)


def fill(store: FeatureStore, shards: list[int] | None = None) -> None:
    for shard in shards if shards is not None else range(store.num_shards):
        with store.shard_writer(shard) as w:
            for i in w.pending():
                if int(i) in FAILED:
                    w.fail(int(i), *FAILED[int(i)])
                else:
                    w.put(int(i), **clip_data(int(i)))


@pytest.fixture(params=[None, 2], ids=["one-chunk-per-shard", "sharding-codec"])
def full_store(tmp_path: Path, request: pytest.FixtureRequest) -> FeatureStore:
    st = make_store(tmp_path / "s.zarr", chunk_clips=request.param)
    fill(st)
    return FeatureStore.open(st.path)


def expected(name: str, i: int) -> np.ndarray:
    return clip_data(i)[name].astype(np.float16)


DONE = [i for i in range(N) if i not in FAILED]


def test_round_trip_numpy_torch_dask(full_store: FeatureStore) -> None:
    st = full_store
    assert st.num_shards == 3 and list(st.clips_in_shard(2)) == [8, 9]
    assert st.is_complete() and st.missing().size == 0 and st.pending_shards() == []
    np.testing.assert_array_equal(st.done_mask(), [i in DONE for i in range(N)])
    assert st.failures() == [
        {"index": i, "clip_id": str(st.clip_ids[i]), "error_type": t, "message": m}
        for i, (t, m) in FAILED.items()
    ]

    arrays = load_arrays(st, with_flow=True, progress=False)
    np.testing.assert_array_equal(arrays.indices, DONE)
    np.testing.assert_array_equal(arrays.labels, [i % 3 if i != 4 else -1 for i in DONE])
    assert arrays.embeddings.dtype == np.float16
    for row, i in enumerate(DONE):
        for name in ("embeddings", "cls", "flow"):
            np.testing.assert_array_equal(getattr(arrays, name)[row], expected(name, i))

    sub = load_arrays(st, adapters=["b2.attn", "b1.attn"], flow_blocks=[1], with_flow=True, progress=False)
    assert sub.adapter_names == ["b2.attn", "b1.attn"] and sub.flow_block_names == ["block2"]
    np.testing.assert_array_equal(sub.embeddings, arrays.embeddings[:, [2, 0]])
    np.testing.assert_array_equal(sub.flow, arrays.flow[:, [1]])

    for in_memory in (True, False):
        ds = FeatureDataset(st, adapters=["b2.attn", 0], with_flow=True, in_memory=in_memory, cache_shards=1)
        assert ds.in_memory is in_memory and len(ds) == len(DONE)
        for k, i in enumerate(DONE):
            item = ds[k]
            assert item["index"] == i and item["label"].item() == st.labels[i]
            assert item["embeddings"].dtype == torch.float32
            np.testing.assert_array_equal(item["embeddings"].numpy(), expected("embeddings", i)[[2, 0]])
            np.testing.assert_array_equal(item["cls"].numpy(), expected("cls", i))
            np.testing.assert_array_equal(item["flow"].numpy(), expected("flow", i))
        batches = list(DataLoader(ds, sampler=ShardOrderedSampler(ds, batch_size=3, seed=1), batch_size=None))
        assert [len(b["index"]) for b in batches] == [3, 3, 2]
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == DONE
        for b in batches:
            for k, i in enumerate(b["index"].tolist()):
                np.testing.assert_array_equal(b["embeddings"][k].numpy(), expected("embeddings", i)[[2, 0]])
                np.testing.assert_array_equal(b["flow"][k].numpy(), expected("flow", i))
                assert b["label"][k] == st.labels[i]
    collated = next(iter(DataLoader(ds, batch_size=4, sampler=ShardOrderedSampler(ds, seed=1))))
    assert collated["embeddings"].shape == (4, 2, V, T, R) and collated["cls"].dtype == torch.float32

    emb = st.to_dask("embeddings")
    assert emb.chunks[0] == (4, 4, 2)  # one dask chunk per shard
    values = emb.compute()
    for i in range(N):
        if i in FAILED:
            assert np.isnan(values[i]).all()
        else:
            np.testing.assert_array_equal(values[i], expected("embeddings", i))
    np.testing.assert_array_equal(st.to_dask("labels").compute(), st.labels)
    np.testing.assert_array_equal(st.read_clip("Cook.Cut_p05_r00_v01_c03.mp4")["cls"], expected("cls", 5))
    assert st.index_of("Cook.Cut_p05_r00_v01_c03.mp4") == 5
    np.testing.assert_array_equal(
        st.index_of(["Cook.Cut_p09_r00_v01_c03.mp4", "Cook.Cut_p00_r00_v01_c03.mp4"]), [9, 0]
    )
    with pytest.raises(KeyError, match="no clip with id 'nope.mp4'"):
        st.index_of("nope.mp4")


def test_h5_export_matches_and_imports_back(full_store: FeatureStore, tmp_path: Path) -> None:
    out = export_h5(full_store, tmp_path / "x.h5", progress=False)
    with h5py.File(out, "r") as f:  # read with h5py only: independent of the store code
        attrs = json.loads(f.attrs["amflow_store"])
        assert attrs["fingerprint"] == full_store.fingerprint
        assert attrs["provenance"]["protocol"] == "CS"
        for i in range(N):
            if i in FAILED:
                assert f["status"][i] == STATUS_FAILED
                assert f["failure_type"].asstr()[i] == FAILED[i][0]
                assert f["failure_message"].asstr()[i] == FAILED[i][1]
            else:
                assert f["status"][i] == STATUS_DONE
                for name in ("embeddings", "cls", "flow"):
                    np.testing.assert_array_equal(f[name][i], expected(name, i))
        assert list(f["clip_ids"].asstr()[:]) == [str(x) for x in full_store.clip_ids]
    with pytest.raises(StoreError, match="exists"):
        export_h5(full_store, out, progress=False)

    back = import_h5(out, tmp_path / "back.zarr", progress=False)
    assert back.attrs == full_store.attrs
    assert back.failures() == full_store.failures()
    np.testing.assert_array_equal(back.status(), full_store.status())
    np.testing.assert_array_equal(back.labels, full_store.labels)
    a, b = (
        load_arrays(back, with_flow=True, progress=False),
        load_arrays(full_store, with_flow=True, progress=False),
    )
    for name in ("indices", "embeddings", "cls", "flow"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert verify_store(back, progress=False) == []


def test_fingerprint_is_sha256_of_canonical_json_and_mismatch_names_fields(full_store: FeatureStore) -> None:
    text = '{"backbone":"vit_tiny_patch16_224","sampling":{"frames":4,"views":2},"weights_sha256":"ab12"}'
    assert full_store.fingerprint == hashlib.sha256(text.encode()).hexdigest() == compute_fingerprint(FIELDS)
    assert check_fingerprint(full_store, dict(FIELDS)) == []
    other = {**FIELDS, "weights_sha256": "ff00", "sampling": {"frames": 8, "views": 2}}
    with pytest.raises(FingerprintMismatch) as err:
        check_fingerprint(full_store, other)
    assert isinstance(err.value, ValueError)
    assert 'weights_sha256: stored "ab12", expected "ff00"' in str(err.value)
    assert "sampling.frames: stored 4, expected 8" in str(err.value)
    assert "backbone" not in str(err.value)
    with pytest.warns(UserWarning, match="weights_sha256"):
        assert len(check_fingerprint(full_store, other, force=True)) == 2


def test_create_resumes_same_store_and_refuses_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.zarr"
    st = make_store(path)
    fill(st, shards=[1])
    again = make_store(path, shard_clips=None)  # same settings: re-opened, work kept
    assert again.done_mask().sum() == 3 and again.failures()[0]["index"] == 7
    assert again.pending_shards() == [0, 2] and list(again.missing()) == [0, 1, 2, 3, 8, 9]

    with pytest.raises(FingerprintMismatch, match='weights_sha256: stored "ab12", expected "cd34"'):
        make_store(path, fingerprint_fields={**FIELDS, "weights_sha256": "cd34"})
    with pytest.raises(StoreError, match="num_adapters: stored 3, asked 4"):
        make_store(path, num_adapters=4, adapter_names=None)
    with pytest.raises(StoreError, match="other labels"):
        make_store(path, labels=[0] * N)
    with pytest.raises(StoreError, match="other clips"):
        make_store(path, clip_ids=[f"x{i}.mp4" for i in range(N)])
    fill(again)
    files = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and "_locks" not in p.parts}
    with caplog.at_level(logging.INFO, logger="store.feature_store"):
        done = make_store(path)
    assert "complete (8 done, 2 failed); nothing to write" in caplog.text
    fill(done)  # re-running a finished extraction writes nothing
    assert files == {
        p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and "_locks" not in p.parts
    }

    fresh = make_store(path, fingerprint_fields={**FIELDS, "weights_sha256": "cd34"}, overwrite=True)
    assert fresh.done_mask().sum() == 0 and fresh.fingerprint_fields["weights_sha256"] == "cd34"

    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "keep.txt").write_text("x")
    with pytest.raises(StoreError, match="not an amflow feature store"):
        make_store(tmp_path / "notastore", overwrite=True)
    assert (tmp_path / "notastore" / "keep.txt").exists()
    with pytest.raises(NotAStoreError, match="not an amflow feature store"):
        FeatureStore.open(tmp_path / "notastore")
    with pytest.raises(StoreError, match="labels: expected 10 labels"):
        make_store(tmp_path / "bad.zarr", labels=[0, 1])
    with pytest.raises(StoreError, match="unique"):
        make_store(tmp_path / "bad.zarr", clip_ids=["a.mp4"] * N)
    assert not (tmp_path / "bad.zarr").exists()


def test_read_only_store_refuses_writes(full_store: FeatureStore) -> None:
    ro = FeatureStore.open(full_store.path, mode="r")
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        ro.shard_writer(0)
    with pytest.raises(Exception, match="(?i)read.only"):
        ro.array("embeddings")[0] = 0


def test_writer_checks_and_shard_lock(tmp_path: Path) -> None:
    st = make_store(tmp_path / "s.zarr", dtype="float16")
    data = clip_data(0)
    with st.shard_writer(0) as w:
        with pytest.raises(ShardBusyError, match="shard 0 is being written"):
            st.shard_writer(0)
        with pytest.raises(ValueError, match=r"embeddings has shape \(3, 2, 4\), expected \(3, 2, 4, 8\)"):
            w.put(0, embeddings=data["embeddings"][..., 0], cls=data["cls"], flow=data["flow"])
        bad = data["embeddings"].copy()
        bad[0, 0, 0, 0] = 1e6  # beyond float16
        with pytest.raises(ValueError, match="1 non-finite value"):
            w.put(0, embeddings=bad, cls=data["cls"], flow=data["flow"])
        with pytest.raises(ValueError, match="flow missing"):
            w.put(0, embeddings=data["embeddings"], cls=data["cls"])
        with pytest.raises(IndexError, match="clip 5 is not in shard 0"):
            w.put(5, **clip_data(5))
        w.put(0, **data)
        assert list(w.pending()) == [1, 2, 3]
        assert st.done_mask().sum() == 0  # buffered, not yet committed
    assert list(st.done_mask().nonzero()[0]) == [0]
    with st.shard_writer(0):  # the lock was released
        pass


def test_partial_commit_failure_retry_and_partial_file_cleanup(tmp_path: Path) -> None:
    st = make_store(tmp_path / "s.zarr")
    with st.shard_writer(0, commit_every=2) as w:
        w.fail(0, "DecodeError", "broken")
        assert st.status()[0] == 0
        w.put(1, **clip_data(1))
        assert list(st.status()[:2]) == [STATUS_FAILED, STATUS_DONE]  # committed after 2 clips
    # The temp names a killed writer leaves: foundation.atomic's and Zarr LocalStore's (``with_suffix``).
    chunk = st.chunk_file("embeddings", 0)
    stale = [chunk.with_name(f".{chunk.name}.4242.partial"), chunk.with_suffix(".0123abcd.partial")]
    assert stale[1].name == "c.0.0.0.0.0123abcd.partial"  # Zarr's drops the chunk key's last ".0"
    chunk1 = st.chunk_file("embeddings", 1)
    other_shard = chunk1.with_name(f".{chunk1.name}.7.partial")
    for p in [*stale, other_shard]:
        p.write_bytes(b"half a shard")
    with st.shard_writer(0) as w:  # retry the failed clip
        assert not any(p.exists() for p in stale) and other_shard.exists()
        assert list(w.pending()) == [2, 3]
        w.put(0, **clip_data(0))
    assert st.failures() == [] and list(st.done_mask()[:4]) == [True, True, False, False]
    np.testing.assert_array_equal(st.read_clip(0)["flow"], expected("flow", 0))
    np.testing.assert_array_equal(st.read_clip(1)["embeddings"], expected("embeddings", 1))
    assert np.isnan(st.read_clip(2)["embeddings"]).all()


def chunk_bytes(st: FeatureStore) -> dict[str, bytes]:
    return {str(p.relative_to(st.path)): p.read_bytes() for p in sorted(st.path.rglob("c.*")) if p.is_file()}


def test_background_commits_write_the_same_files_and_reraise_a_failed_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inline = make_store(tmp_path / "inline.zarr")
    fill(inline)
    st = make_store(tmp_path / "bg.zarr")
    with BackgroundCommits() as commits:
        for shard in range(st.num_shards):
            w = st.shard_writer(shard)
            for i in w.pending():
                if int(i) in FAILED:
                    w.fail(int(i), *FAILED[int(i)])
                else:
                    w.put(int(i), **clip_data(int(i)))
            commits.close(w)
    # 3 shards x (embeddings, cls, flow, status) + failure type and message of the 2 shards with failures
    assert chunk_bytes(st) == chunk_bytes(inline) and len(chunk_bytes(st)) == 3 * 4 + 2 * 2
    assert st.counts() == inline.counts()

    # A commit that fails on the background thread is raised by the next close (or wait); its lock is free.
    broken = make_store(tmp_path / "broken.zarr")
    calls = []

    def full_disk(self):
        calls.append(self.shard)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("store.writer.ShardWriter.commit", full_disk)
    with pytest.raises(OSError, match="No space left"), BackgroundCommits(max_pending=1) as commits:
        w = broken.shard_writer(0)
        w.put(0, **clip_data(0))
        commits.close(w)
        commits.close(broken.shard_writer(1))  # waits for shard 0's commit first: raises it
    assert calls == [0]
    monkeypatch.undo()
    with broken.shard_writer(0), broken.shard_writer(1):  # both locks were released
        pass
    assert broken.counts()["done"] == 0


def test_sampler_visits_shards_one_at_a_time(full_store: FeatureStore) -> None:
    ds = FeatureDataset(full_store, in_memory=False)
    order = list(ShardOrderedSampler(ds, seed=3))
    assert sorted(order) == list(range(len(ds)))
    shards = ds.shard_of_items()[order]
    assert (np.diff(shards) != 0).sum() == full_store.num_shards - 1  # each shard is one contiguous run
    sampler = ShardOrderedSampler(ds, seed=3)
    assert list(sampler) == order
    batches = list(ShardOrderedSampler(ds, seed=3, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 2] and sum(batches, []) == order
    assert list(ShardOrderedSampler(ds, seed=3, batch_size=3, drop_last=True)) == batches[:2]
    assert list(ShardOrderedSampler(ds, shuffle=False)) == list(range(len(ds)))
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1


def test_memory_budget_and_clip_bytes_by_hand(full_store: FeatureStore) -> None:
    # float16 per clip: embeddings A x V x T x R = 192 values (64 an adapter), cls V x D = 12, flow
    # blocks x V x T x heads x tokens = 240 (120 a block).
    assert clip_bytes(full_store, {"embeddings": None, "cls": None}) == 2 * (192 + 12)
    assert clip_bytes(full_store, {"embeddings": [2, 0], "cls": None, "flow": [1]}) == 2 * (128 + 12 + 120)
    ds = FeatureDataset(full_store, adapters=["b2.attn", 0], flow_blocks=[1], with_flow=True)
    assert ds.nbytes == 520 * len(DONE) and ds.in_memory  # 8 done clips fit half the available RAM
    kwargs = dict(adapters=["b2.attn", 0], flow_blocks=[1], with_flow=True)
    assert FeatureDataset(full_store, memory_limit_bytes=520 * 8, **kwargs).in_memory
    assert not FeatureDataset(full_store, memory_limit_bytes=520 * 8 - 1, **kwargs).in_memory
    # Stage 2 reads done, labelled clips (clip 4 has no label); no adapter still reads one (64 values).
    sel = store_selection(full_store.path, ["b2.attn", 0], [1], with_flow=True)
    assert (sel.clip_bytes, sel.num_clips, sel.nbytes, sel.shard_bytes) == (520, 7, 520 * 7, 520 * SHARD)
    assert store_selection(full_store.path, [], with_flow=False).clip_bytes == 2 * (64 + 12)


def test_read_ahead_yields_the_same_batches(
    full_store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    released = threading.Event()

    def read(store, axis1, shard, spare=None):
        reads.append(shard)
        if shard != shard_order[0]:
            released.wait(10)  # reads ahead wait until the first batch has been taken
        return read_shard_arrays(store, axis1, shard, spare)

    monkeypatch.setattr("store.dataset.read_shard_arrays", read)
    streamed = FeatureDataset(full_store, with_flow=True, in_memory=False, cache_shards=2)
    held = FeatureDataset(full_store, with_flow=True, in_memory=True)
    sampler = ShardOrderedSampler(streamed, batch_size=1, seed=5)  # a shard holds 2-3 done clips
    shard_order = list(dict.fromkeys(streamed.shard_of_items()[sampler.order()].tolist()))
    loader = iter(DataLoader(streamed, sampler=sampler, batch_size=None))
    batches = [next(loader)]
    for _ in range(500):  # the next shard is being read before the first is used up
        if len(reads) >= 2:
            break
        time.sleep(0.01)
    assert sorted(reads) == sorted(shard_order[:2])
    released.set()
    batches += list(loader)
    assert sorted(reads) == sorted(shard_order)  # each shard read once
    expected_batches = list(
        DataLoader(held, sampler=ShardOrderedSampler(held, batch_size=1, seed=5), batch_size=None)
    )
    assert len(batches) == len(expected_batches) == len(DONE)
    for a, b in zip(batches, expected_batches, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    streamed.close()


def test_info_verify_and_cli(full_store: FeatureStore, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def cli(*argv: str) -> int:  # through amflow.cli.main: its one error path turns errors into exit 2
        return main(list(argv))

    assert cli("store", "info", str(full_store.path), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_clips"], info["done"], info["failed"], info["missing"]) == (N, 8, 2, 0)
    assert info["fingerprint"] == full_store.fingerprint and info["provenance"]["split"] == "train"
    emb = info["arrays"]["embeddings"]
    assert emb["shape"] == [N, A, V, T, R] and emb["dtype"] == "float16"
    assert emb["bytes_on_disk"] == sum(
        p.stat().st_size for p in (full_store.path / "embeddings").rglob("*") if p.is_file()
    )
    assert set(info["arrays"]) >= {"embeddings", "flow", "cls", "labels", "clip_ids", "status"}
    assert cli("store", "info", str(full_store.path)) == 0
    assert "embeddings" in capsys.readouterr().out

    assert cli("store", "verify", str(full_store.path), "--quiet") == 0
    capsys.readouterr()
    FeatureStore.open(full_store.path, mode="r+").array("cls")[5, 1, 3] = np.nan  # corrupt a done clip
    assert verify_store(full_store.path, progress=False) == [
        f"cls: 1 done clip(s) with missing or non-finite values: 5 ({full_store.clip_ids[5]})"
    ]
    assert cli("store", "verify", str(full_store.path), "--quiet") == 1
    assert "cls: 1 done clip(s)" in capsys.readouterr().err

    h5 = tmp_path / "e.h5"
    assert cli("store", "export", str(full_store.path), "--h5", str(h5), "--quiet") == 0
    assert cli("store", "import", str(h5), "--out", str(tmp_path / "i.zarr"), "--quiet") == 0
    assert store_info(tmp_path / "i.zarr")["done"] == 8
    capsys.readouterr()
    assert cli("store", "info", str(tmp_path)) == 2
    assert "not an amflow feature store" in capsys.readouterr().err


def test_float16_bit_checks_agree_with_numpy() -> None:
    from store.schema import fill_nan, has_nonfinite, nonfinite_mask

    edge = np.array([0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8, 1.0, np.inf, -np.inf, np.nan], np.float16)
    negative_nan = np.array([np.nan], np.float16).view(np.uint16) | 0x8000
    values = np.concatenate([edge, negative_nan.view(np.float16)])
    for i in range(len(values)):
        one = values[i : i + 1]
        assert has_nonfinite(one) == (not np.isfinite(one).all()), one
        assert has_nonfinite(values[: i + 1]) == (not np.isfinite(values[: i + 1]).all())
    np.testing.assert_array_equal(nonfinite_mask(values), ~np.isfinite(values))
    assert not has_nonfinite(np.empty(0, np.float16))
    for dtype in (np.float16, np.float32, np.float64):
        rows = np.ones((3, 4), dtype)
        fill_nan(rows, 1)
        assert np.isnan(rows[1]).all() and not np.isnan(rows[[0, 2]]).any()
        assert np.isnan(fill_nan(rows)).all()
