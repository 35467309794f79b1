"""Write and read throughput of the feature store against numpy.save / np.load of the same bytes.

Writes are equally durable on both sides: the store's shard commits (data, then status, each made durable
in order) against ``np.save`` of the two arrays, each file fsync'd, then the folder (the new names); each
side deletes its last output outside the timing, and each pattern runs once untimed on each side first.

Read patterns are stage 2's: the whole store into memory (``load_arrays`` vs ``np.load``), and
shard-ordered random batches read out of core (``FeatureDataset(in_memory=False)`` + ``ShardOrderedSampler``
vs fancy-indexing an ``np.load(mmap_mode="r")`` array in the same order). Files are fresh, so reads
come from the page cache on both sides. Example:

    python benchmarks/store_throughput.py                       # 512 clips, ~150 MB, < 1 min
    python benchmarks/store_throughput.py --clips 2048 --compression zstd:1

With ``--store-url s3://BUCKET/PREFIX`` (credentials and endpoint from the AWS_* variables) the store's
side is also run on object storage, interleaved with the same store on local disk: write, whole read,
shard-ordered batches and one streamed stage-2 epoch (``StreamedFeatures`` under a memory budget of four
shards, every clip read once in the epoch's order, no training), as object-store / local-disk time; and the
server's floor: every shard object's bytes fetched with concurrent GETs and nothing else (no reader can be
faster than that on that server).
Against a local S3 server (``moto_server -H 127.0.0.1 -p 5000`` and ``AWS_ENDPOINT_URL=http://127.0.0.1:5000``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from foundation.atomic import fsync_file
from store import BackgroundCommits, FeatureDataset, FeatureStore, ShardOrderedSampler, is_store, load_arrays
from store.objects import default_read_threads, is_url


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=512, help="number of clips (default 512, ~150 MB)")
    p.add_argument("--adapters", type=int, default=24)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--dim", type=int, default=768, help="adapter bottleneck r")
    p.add_argument("--cls-dim", type=int, default=768)
    p.add_argument("--shard-clips", type=int, default=None, help="default: the store's automatic choice")
    p.add_argument("--chunk-clips", type=int, default=None, help="clips per chunk inside a shard")
    p.add_argument("--compression", default="none", help="none | zstd[:level] | blosc[:level]")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="reads are repeated; the median is reported")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    p.add_argument(
        "--store-url", default=None, help="also run the store on object storage (s3://BUCKET/PREFIX)"
    )
    return p.parse_args()


def interleaved(
    store_fn: Callable[[], float | None], numpy_fn: Callable[[], object], repeats: int
) -> tuple[float, float, float]:
    """Median store seconds, median numpy seconds and median per-repeat ratio, the two runs alternating
    so that both see the same machine load, after one untimed run of each (on a VM, memory the guest
    has not touched before is slow to fault in: ~180 MB/s here)."""
    store_fn(), numpy_fn()
    ts, tn = [], []
    for _ in range(repeats):
        for fn, out in ((store_fn, ts), (numpy_fn, tn)):
            t = time.perf_counter()
            counted = fn()  # a function may return the seconds to count (excluding its set-up)
            out.append(counted if isinstance(counted, float) else time.perf_counter() - t)
    return (
        statistics.median(ts),
        statistics.median(tn),
        statistics.median(n / s for s, n in zip(ts, tn, strict=True)),
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    shape = (args.clips, args.adapters, args.views, args.frames, args.dim)
    # Pooled ReLU embeddings are non-negative; |N(0,1)| gives float16 data of similar entropy.
    emb = np.abs(rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    cls = rng.standard_normal((args.clips, args.views, args.cls_dim), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, 31, args.clips)
    mb = (emb.nbytes + cls.nbytes) / 1e6
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="store_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)
    store_path, emb_npy, cls_npy = scratch / "bench.zarr", scratch / "emb.npy", scratch / "cls.npy"
    shutil.rmtree(store_path, ignore_errors=True)
    try:
        # ---- write (a fresh store / fresh .npy files each repeat, the two alternating)
        create_seconds: list[float] = []

        def store_write(location: str | Path = store_path) -> float:
            if is_url(location):
                if is_store(location):
                    FeatureStore.open(location, mode="r+").objects.delete_all()
            else:
                shutil.rmtree(location, ignore_errors=True)
            t = time.perf_counter()
            st = FeatureStore.create(
                location,
                clip_ids=[f"clip_{i:06d}.mp4" for i in range(args.clips)],
                labels=labels,
                num_adapters=args.adapters,
                num_views=args.views,
                num_frames=args.frames,
                embed_dim=args.dim,
                cls_dim=args.cls_dim,
                shard_clips=args.shard_clips,
                chunk_clips=args.chunk_clips,
                compression=args.compression,
                provenance={"benchmark": True},
                fingerprint_fields={"benchmark": True},
            )
            create_seconds.append(time.perf_counter() - t)
            t = time.perf_counter()
            with BackgroundCommits() as commits:  # as extraction writes: a shard commits during the next
                for shard in range(st.num_shards):
                    w = st.shard_writer(shard)
                    for i in w.pending():
                        w.put(int(i), embeddings=emb[i], cls=cls[i])
                    commits.close(w)
            return time.perf_counter() - t

        def numpy_write() -> float:
            # The last repeat's files are deleted outside the timing, as the store's (whose creation's
            # fsyncs make the deletion durable; here the folder's fsync).
            for path in (emb_npy, cls_npy):
                path.unlink(missing_ok=True)
            fsync_file(scratch)
            t = time.perf_counter()
            for path, arr in ((emb_npy, emb), (cls_npy, cls)):
                np.save(path, arr)
                fsync_file(path)
            fsync_file(scratch)
            return time.perf_counter() - t

        write = interleaved(store_write, numpy_write, args.repeats)
        store_create = statistics.median(create_seconds)
        st = FeatureStore.open(store_path)

        # ---- whole store into memory
        def store_load() -> None:
            out = load_arrays(st, progress=False)
            assert out.embeddings.shape == emb.shape

        def numpy_load() -> None:
            e, c = np.load(emb_npy), np.load(cls_npy)
            assert e.shape == emb.shape and c.shape == cls.shape

        out = load_arrays(st, progress=False)
        assert np.array_equal(out.embeddings, emb) and np.array_equal(out.cls, cls)
        read = interleaved(store_load, numpy_load, args.repeats)

        # ---- shard-ordered random batches, out of core
        ds = FeatureDataset(st, in_memory=False, cache_shards=2)
        sampler = ShardOrderedSampler(ds, batch_size=args.batch_size, seed=0)
        order = sampler.order()

        def store_batches() -> None:
            for batch in DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0):
                assert batch["embeddings"].dtype == torch.float32

        def numpy_batches() -> None:
            e, c = np.load(emb_npy, mmap_mode="r"), np.load(cls_npy, mmap_mode="r")
            for k in range(0, len(order), args.batch_size):
                idx = order[k : k + args.batch_size]
                be = torch.from_numpy(e[idx].astype(np.float32))
                bc = torch.from_numpy(c[idx].astype(np.float32))
                assert be.dtype == bc.dtype == torch.float32

        batches = interleaved(store_batches, numpy_batches, args.repeats)
        remote_rows = compare_object_store(args, store_write, store_path) if args.store_url else []
        on_disk = sum(p.stat().st_size for p in store_path.rglob("*") if p.is_file()) / 1e6
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"{args.clips} clips x {args.adapters} adapters x {args.views} views x {args.frames} frames "
        f"x r {args.dim} + cls {args.cls_dim}: {mb:.1f} MB float16; store: {st.num_shards} shards of "
        f"{st.shard_clips} clips, chunks of {st.layout.chunk_clips}, compression {st.layout.compression}, "
        f"{on_disk:.1f} MB on disk; creating the empty store took {store_create:.2f} s"
    )
    rows = [
        ("write (fsync'd)", *write),
        ("read whole store into memory", *read),
        (f"shard-ordered batches of {args.batch_size}", *batches),
    ]
    print(f"{'pattern':<34}{'store MB/s':>12}{'numpy MB/s':>12}{'store/numpy':>13}")
    for name, ts, tn, ratio in rows:
        print(f"{name:<34}{mb / ts:>12.0f}{mb / tn:>12.0f}{ratio:>13.2f}")
    print("(medians of interleaved repeats; ratio = median of the per-repeat ratios)")
    if remote_rows:
        print(f"\n{args.store_url} against local disk (the same store)")
        print(f"{'pattern':<34}{'object MB/s':>12}{'local MB/s':>12}{'object/local time':>19}")
        for name, to, tl, ratio in remote_rows:
            print(f"{name:<34}{mb / to:>12.0f}{mb / tl:>12.0f}{1 / ratio:>19.2f}")
        print("(medians of interleaved repeats; time ratio = median of the per-repeat ratios)")
        times = {name: to for name, to, _tl, _ratio in remote_rows}
        floor = times["stage-2 epoch, streamed"] / times["fetch every shard, nothing else"]
        print(f"object-store epoch / the server's floor (median times): {floor:.2f}")


def compare_object_store(
    args: argparse.Namespace, store_write: Callable[..., float], local: Path
) -> list[tuple[str, float, float, float]]:
    """The store's write and read patterns on ``--store-url`` and on local disk, interleaved."""
    from stage2_temporal.training.stream import StreamedFeatures, store_selection

    url = args.store_url
    write = interleaved(lambda: store_write(url), lambda: store_write(local), args.repeats)
    stores = {"object": FeatureStore.open(url), "local": FeatureStore.open(local)}

    def whole(st: FeatureStore) -> Callable[[], None]:
        return lambda: load_arrays(st, progress=False)

    def batches(st: FeatureStore) -> Callable[[], None]:
        ds = FeatureDataset(st, in_memory=False, cache_shards=2)
        sampler = ShardOrderedSampler(ds, batch_size=args.batch_size, seed=0)
        return lambda: [b for b in DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0)]

    def fetch(st: FeatureStore) -> Callable[[], None]:
        # The bytes of every shard object and nothing else (concurrent GETs, no copy): the least time any
        # reader of this store can take on that server.
        chunks = [(name, shard) for shard in range(st.num_shards) for name in ("embeddings", "cls")]

        def get(chunk: tuple[str, int]) -> object:
            if st.objects is not None:
                return st.objects.get(st.chunk_key(*chunk))
            return st.chunk_file(*chunk).read_bytes()

        def run() -> None:
            with ThreadPoolExecutor(default_read_threads(st)) as pool:
                list(pool.map(get, chunks))

        return run

    def epoch(location: str | Path) -> Callable[[], float]:
        shard_bytes = store_selection(location).shard_bytes  # four shards held: streamed, read ahead
        features = StreamedFeatures(location, memory_budget=4 * shard_bytes)
        generator = torch.Generator().manual_seed(0)

        def run() -> float:
            t = time.perf_counter()
            order = features.epoch_order(generator)
            for k in range(0, len(order), args.batch_size):
                clips = order[k : k + args.batch_size]
                features.batch(clips, torch.zeros_like(clips), "cpu")
            return time.perf_counter() - t

        return run

    return [
        ("write (one PUT per shard file)", *write),
        (
            "read whole store into memory",
            *interleaved(whole(stores["object"]), whole(stores["local"]), args.repeats),
        ),
        (
            f"shard-ordered batches of {args.batch_size}",
            *interleaved(batches(stores["object"]), batches(stores["local"]), args.repeats),
        ),
        ("stage-2 epoch, streamed", *interleaved(epoch(url), epoch(local), args.repeats)),
        (
            "fetch every shard, nothing else",
            *interleaved(fetch(stores["object"]), fetch(stores["local"]), args.repeats),
        ),
    ]


if __name__ == "__main__":
    main()
