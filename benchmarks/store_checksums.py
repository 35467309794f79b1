"""What Zarr's chunk checksums (the ``crc32c`` codec) would cost a store: one shard file written and read.

``store verify`` finds NaN/inf, unreadable and truncated files, but not finite garbage inside a plain
chunk (a flipped bit in a float16 is another float16). A crc32c per chunk would find it. Compared, for
one shard of the default size (~32 MiB of float16, the store's plain-bytes layout):

- ``raw``: the store's path today (``store.fastio``: one write, one ``readinto`` of the file);
- ``zarr``: the same array through Zarr's codec pipeline (what a store without the raw fast path pays);
- ``zarr+crc32c``: Zarr's pipeline with the ``crc32c`` codec after ``bytes``;
- ``crc32c only``: computing the checksum of the shard's bytes (``google_crc32c``, what the raw path
  would add if it wrote and checked the same 4 bytes itself).

Writes are not fsync'd (page cache, both sides alike); the median of ``--repeats`` is printed. Example:

    python benchmarks/store_checksums.py                 # 32 MiB shard, ~20 s
    python benchmarks/store_checksums.py --mib 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from foundation.atomic import rename_into_place
from store.fastio import read_raw_rows, stage_raw_chunk


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=32.0, help="shard size in MiB (default 32, the store's)")
    p.add_argument("--row", type=int, default=24 * 8 * 768, help="float16 values per clip (ViT-B AM/12)")
    p.add_argument("--repeats", type=int, default=7, help="each timing is repeated; the median is printed")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    return p.parse_args()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    rows = max(1, int(args.mib * 2**20 / (2 * args.row)))
    data = np.random.default_rng(0).standard_normal((rows, args.row)).astype(np.float16)
    mib = data.nbytes / 2**20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        group = zarr.open_group(LocalStore(root / "s.zarr"), mode="w", zarr_format=3)
        arrays = {
            name: group.create_array(
                name,
                shape=data.shape,
                dtype="float16",
                chunks=data.shape,
                serializer=BytesCodec(),
                compressors=compressors,
                fill_value=np.nan,
            )
            for name, compressors in (("zarr", None), ("zarr+crc32c", [Crc32cCodec()]))
        }
        raw_file = root / "raw.bin"
        out = np.empty_like(data)

        def raw_write() -> None:
            stage_raw_chunk(raw_file, data, rows, np.nan)  # not fsync'd, as Zarr's side
            rename_into_place(raw_file)

        def raw_read() -> None:
            read_raw_rows(raw_file, out, row_shape=data.shape[1:], fill_value=np.nan)

        timings: dict[str, tuple[float, float]] = {"raw": (median_seconds(raw_write, args.repeats), 0.0)}
        timings["raw"] = (timings["raw"][0], median_seconds(raw_read, args.repeats))
        for name, arr in arrays.items():
            write = median_seconds(lambda arr=arr: arr.__setitem__(slice(None), data), args.repeats)
            read = median_seconds(lambda arr=arr: arr[:], args.repeats)
            assert np.array_equal(arr[:], data, equal_nan=True)
            timings[name] = (write, read)
        flat = data.view(np.uint8).reshape(-1)  # a numpy array, as Zarr passes it
        crc = median_seconds(lambda: google_crc32c.value(flat), args.repeats)
        timings["crc32c only"] = (crc, crc)
        stored = (root / "s.zarr" / "zarr+crc32c" / "c" / "0" / "0").stat().st_size
        assert stored == data.nbytes + 4  # the checksum is 4 bytes after the chunk's values

    base_w, base_r = timings["raw"]
    print(f"one shard: {rows} clips x {args.row} float16 = {mib:.1f} MiB; median of {args.repeats}")
    print(f"{'path':<14}{'write MiB/s':>13}{'x raw':>8}{'read MiB/s':>13}{'x raw':>8}")
    for name, (w, r) in timings.items():
        print(f"{name:<14}{mib / w:>13.0f}{w / base_w:>8.2f}{mib / r:>13.0f}{r / base_r:>8.2f}")
    zw, zr = timings["zarr"]
    cw, cr = timings["zarr+crc32c"]
    print(
        f"crc32c on Zarr's path: write x{cw / zw:.2f}, read x{cr / zr:.2f}; "
        f"checksum alone = {100 * crc / base_r:.0f}% of a raw read"
    )


if __name__ == "__main__":
    main()
