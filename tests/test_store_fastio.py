"""Direct shard-file reads and writes agree byte for byte with Zarr's own codec pipeline."""

from pathlib import Path

import numpy as np
import zarr

from store import FeatureStore, load_arrays
from store.fastio import is_raw, read_raw_rows
from store.reader import read_shard


def make(path: Path, num_clips: int, compression: str = "none") -> FeatureStore:
    return FeatureStore.create(
        path,
        clip_ids=[f"c{i}.mp4" for i in range(num_clips)],
        labels=np.arange(num_clips) % 3,
        num_adapters=5,
        num_views=2,
        num_frames=3,
        embed_dim=4,
        cls_dim=6,
        shard_clips=4,
        compression=compression,
        provenance={},
        fingerprint_fields={},
    )


def data(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"embeddings": rng.standard_normal((5, 2, 3, 4)), "cls": rng.standard_normal((2, 6))}


def test_raw_writes_read_back_through_zarr_and_raw_reads_match_zarr(tmp_path):
    st = make(tmp_path / "s.zarr", 10)  # last shard partial (2 of 4 clips): Zarr pads the edge chunk
    assert is_raw(st.array("embeddings")) and is_raw(st.array("status"))
    for shard in range(st.num_shards):
        with st.shard_writer(shard) as w:
            for i in w.pending():
                if i != 5:
                    w.put(int(i), **data(int(i)))
    # Zarr's own reader decodes the files written by the direct path (padding included).
    plain = zarr.open_group(tmp_path / "s.zarr", mode="r")
    emb = np.asarray(plain["embeddings"][:])
    for i in range(10):
        want = np.full((5, 2, 3, 4), np.nan) if i == 5 else data(i)["embeddings"].astype(np.float16)
        np.testing.assert_array_equal(emb[i], want)
    assert list(np.asarray(plain["status"][:])) == [1] * 5 + [0] + [1] * 4
    # The direct reader, with and without a selection on axis 1, equals Zarr's selection.
    for shard in range(st.num_shards):
        clips = st.clips_in_shard(shard)
        for sel in (None, [0, 1, 3], [4, 2]):
            got = read_shard(st, "embeddings", shard, axis1=sel)
            want = plain["embeddings"].get_orthogonal_selection(
                (slice(clips.start, clips.stop), sel or slice(None))
            )
            np.testing.assert_array_equal(got, want)
    out = load_arrays(st, adapters=[3, 0], progress=False)
    np.testing.assert_array_equal(out.embeddings, emb[out.indices][:, [3, 0]])
    # A shard nobody wrote reads as the fill value.
    missing = np.zeros((2, 6), np.float16)
    read_raw_rows(tmp_path / "nowhere", missing, row_shape=(2, 6), fill_value=np.nan)
    assert np.isnan(missing).all()


def test_compressed_store_goes_through_zarr(tmp_path):
    st = make(tmp_path / "z.zarr", 4, compression="zstd:1")
    assert not is_raw(st.array("embeddings"))
    with st.shard_writer(0) as w:
        for i in w.pending():
            w.put(int(i), **data(int(i)))
    got = read_shard(st, "embeddings", 0, axis1=[1])
    np.testing.assert_array_equal(
        got[:, 0], np.stack([data(i)["embeddings"][1] for i in range(4)]).astype(np.float16)
    )


def test_rejected_put_leaves_the_buffered_clip_as_it_was(tmp_path):
    st = make(tmp_path / "s.zarr", 4)
    with st.shard_writer(0) as w:
        w.put(0, **data(0))
        bad = data(9)
        bad["cls"][1, 2] = 1e6  # beyond float16: rejected after the embeddings were already cast
        for i in (0, 1):
            try:
                w.put(i, **bad)
            except ValueError as e:
                assert "non-finite" in str(e)
            else:
                raise AssertionError("a float16 overflow must be rejected")
    np.testing.assert_array_equal(st.read_clip(0)["embeddings"], data(0)["embeddings"].astype(np.float16))
    assert np.isnan(st.read_clip(1)["embeddings"]).all() and list(st.status()) == [1, 0, 0, 0]


def test_put_casts_float32_to_float16_as_numpy_does(tmp_path):
    """put casts float32 with torch (fast path) and anything else with numpy: the stored bits are numpy's
    ``astype`` either way, at float16's edges (ties, subnormals, the largest finite values) too."""
    st = make(tmp_path / "s.zarr", 4)
    edges = [65519.0, -65504.0, 65505.0, 1 + 2**-11, 1 + 3 * 2**-11, 2.0**-24, 1.5 * 2**-24, 2.0**-26, -0.0]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(120) * 2.0 ** rng.integers(-26, 15, 120)).astype(np.float32)
    values[: len(edges)] = edges
    emb = values.reshape(5, 2, 3, 4)
    cls = rng.standard_normal((2, 6)).astype(np.float32)
    read_only = emb.copy()
    read_only.flags.writeable = False
    # torch's cast; numpy's for negative strides, a read-only array and float64
    inputs = [emb, emb[..., ::-1].copy()[..., ::-1], read_only, emb.astype(np.float64)]
    with st.shard_writer(0) as w:
        for i, e in enumerate(inputs):
            w.put(i, embeddings=e, cls=cls)
    stored = load_arrays(st, progress=False).embeddings
    for i in range(4):
        assert stored[i].tobytes() == emb.astype(np.float16).tobytes(), i


def test_a_reused_shard_buffer_writes_nan_where_no_clip_was_put(tmp_path):
    """The next writer reuses a closed writer's buffers (``SpareBuffers``): rows of clips it was not given
    must still be written as NaN, not as the last shard's values."""
    st = make(tmp_path / "s.zarr", 8)
    with st.shard_writer(0) as w:
        for i in range(4):
            w.put(i, **data(i))
    with st.shard_writer(1) as w:
        w.put(5, **data(5))
        w.fail(6, "DecodeError", "cannot decode")
    rows = read_shard(st, "embeddings", 1)
    np.testing.assert_array_equal(rows[1], data(5)["embeddings"].astype(np.float16))
    assert np.isnan(rows[[0, 2, 3]]).all() and list(st.status()[4:]) == [0, 1, 2, 0]
    np.testing.assert_array_equal(read_shard(st, "cls", 0)[3], data(3)["cls"].astype(np.float16))


def test_a_commit_makes_the_data_durable_before_the_status_counts(tmp_path, monkeypatch):
    """The power-loss order of store/SCHEMA.md, from the fsyncs and renames a commit makes: every file
    fsync'd under its temp name before its rename; the data files' folders fsync'd after their renames
    and before the status file's rename; the status folder fsync'd after it."""
    import os

    st = make(tmp_path / "s.zarr", 4)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("rename", str(dst)))

    with st.shard_writer(0) as w:
        for i in range(4):
            w.put(i, **data(i))
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
    monkeypatch.undo()

    def at(kind: str, path: Path) -> int:
        return events.index((kind, str(path)))

    status = st.chunk_file("status", 0)
    for name in ("embeddings", "cls", "status"):
        chunk = st.chunk_file(name, 0)
        temp = chunk.with_name(f".{chunk.name}.{os.getpid()}.partial")
        assert at("fsync", temp) < at("rename", chunk) < at("fsync", chunk.parent), name
        if name != "status":
            assert at("fsync", chunk.parent) < at("rename", status), name
