"""Crash safety and concurrency of the feature store, with real writer processes.

Run as a script, this file is the writer process the tests start (and kill with SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from store import STATUS_DONE, FeatureStore, load_arrays, verify_store
from store.layout import FlowBlock

NUM_CLIPS = 30
SHARD_CLIPS = 4  # 8 shards, the last one partial
CHUNK_CLIPS = 2  # two Zarr chunks inside each shard file (the sharding codec)
SHAPE = {"num_adapters": 3, "num_views": 1, "num_frames": 4, "embed_dim": 64, "cls_dim": 32}
FLOW_SHAPE = (2, 3, 17)
FINGERPRINT = {"backbone": "vit_tiny", "adapters": 3, "seed": 0}


def expected_clip(i: int) -> dict[str, np.ndarray] | None:
    """The data a writer stores for clip i (None: the clip fails), independent of any store code."""
    if i % 7 == 5:
        return None
    rng = np.random.default_rng(1000 + i)
    a, v, t, r, d = (SHAPE[k] for k in ("num_adapters", "num_views", "num_frames", "embed_dim", "cls_dim"))
    return {
        "embeddings": rng.standard_normal((a, v, t, r)).astype(np.float32),
        "cls": rng.standard_normal((v, d)).astype(np.float32),
        "flow": rng.random((FLOW_SHAPE[0], v, t, FLOW_SHAPE[1], FLOW_SHAPE[2])).astype(np.float32) * 3,
    }


def create(path: Path) -> FeatureStore:
    """Creates (or re-opens for resuming) the test store."""
    return FeatureStore.create(
        path,
        clip_ids=[f"videos/clip_{i:03d}.mp4" for i in range(NUM_CLIPS)],
        labels=[i % 5 if i % 9 else -1 for i in range(NUM_CLIPS)],
        flow_blocks=[FlowBlock(FLOW_SHAPE[1], FLOW_SHAPE[2])] * FLOW_SHAPE[0],
        shard_clips=SHARD_CLIPS,
        chunk_clips=CHUNK_CLIPS,
        provenance={"dataset": "synthetic", "split": "train"},
        fingerprint_fields=FINGERPRINT,
        **SHAPE,
    )


def write(store: FeatureStore, shards: list[int], delay: float, commit_every: int | None) -> None:
    """Writes the missing clips of ``shards`` (what a resumed stage-1 extraction does)."""
    for shard in shards:
        with store.shard_writer(shard, commit_every=commit_every) as w:
            for i in w.pending():
                time.sleep(delay)
                data = expected_clip(int(i))
                if data is None:
                    w.fail(int(i), "DecodeError", f"cannot decode clip {int(i)}")
                else:
                    w.put(int(i), **data)


def _die_before_status_write(commit_number: int) -> None:
    """Makes the writer SIGKILL itself after a commit's data files, before its status chunk is written."""
    from store import writer

    original = writer.ShardWriter._write_texts
    count = {"n": 0}

    def patched(self: writer.ShardWriter, types: np.ndarray, messages: np.ndarray) -> None:
        count["n"] += 1
        if count["n"] == commit_number:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, types, messages)

    writer.ShardWriter._write_texts = patched


def _spawn_writer(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _wait_ready(proc: subprocess.Popen) -> subprocess.Popen:
    line = proc.stdout.readline()  # "ready" once the store exists
    assert line.strip() == "ready", proc.stderr.read()
    return proc


def _start_writer(path: Path, *args: str) -> subprocess.Popen:
    return _wait_ready(_spawn_writer(path, *args))


def _check_done_clips_complete(path: Path) -> FeatureStore:
    """The store opens, and every clip marked done holds exactly its data (float16 of the expected)."""
    st = FeatureStore.open(path)
    arrays = load_arrays(st, with_flow=True, progress=False)
    for row, i in enumerate(arrays.indices):
        expected = expected_clip(int(i))
        assert expected is not None, f"clip {i} should have failed, but is done"
        for name in ("embeddings", "cls", "flow"):
            np.testing.assert_array_equal(getattr(arrays, name)[row], expected[name].astype(np.float16))
    for record in st.failures():
        assert expected_clip(record["index"]) is None
        assert record["error_type"] == "DecodeError"
    return st


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    reference = create(tmp_path / "reference.zarr")
    write(reference, list(range(reference.num_shards)), delay=0.0, commit_every=None)

    path = tmp_path / "killed.zarr"
    # A deterministic kill in the critical window: a commit's data written, its status not yet.
    proc = _start_writer(path, "--delay", "0", "--commit-every", "2", "--die-before-status", "2")
    assert proc.wait(timeout=30) == -signal.SIGKILL
    st = _check_done_clips_complete(path)
    assert st.done_mask().sum() == 2 - (expected_clip(0) is None) - (expected_clip(1) is None)
    assert st.status()[2:].max() == 0, "the interrupted commit marked nothing done"

    rng = np.random.default_rng(20240607)
    done_counts, incomplete_after_kill = [int(st.done_mask().sum())], 0
    for _trial in range(5):
        proc = _start_writer(path, "--delay", "0.03", "--commit-every", "2")
        time.sleep(float(rng.uniform(0.02, 0.25)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        st = _check_done_clips_complete(path)
        done_counts.append(int(st.done_mask().sum()))
        incomplete_after_kill += not st.is_complete()
    assert incomplete_after_kill >= 3, "the kills should land before the writer finishes"
    assert done_counts == sorted(done_counts), "done clips never become undone"

    proc = _start_writer(path, "--delay", "0", "--commit-every", "3")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()

    st = FeatureStore.open(path)
    assert st.is_complete() and verify_store(st, progress=False) == []
    np.testing.assert_array_equal(st.clip_ids, reference.clip_ids)
    np.testing.assert_array_equal(st.labels, reference.labels)
    np.testing.assert_array_equal(st.status(), reference.status())
    assert st.failures() == reference.failures()
    assert st.fingerprint == reference.fingerprint
    got, want = (
        load_arrays(st, with_flow=True, progress=False),
        load_arrays(reference, with_flow=True, progress=False),
    )
    for name in ("indices", "embeddings", "cls", "flow"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert not list(path.rglob("*.partial")), "temp files of killed writers are cleaned up on resume"


def test_two_processes_writing_different_shards(tmp_path: Path) -> None:
    path = tmp_path / "parallel.zarr"
    num_shards = -(-NUM_CLIPS // SHARD_CLIPS)
    even = [str(s) for s in range(0, num_shards, 2)]
    odd = [str(s) for s in range(1, num_shards, 2)]
    # Both processes also race to create the store: one creates it, the other re-opens it.
    procs = [
        _spawn_writer(path, "--delay", "0.005", "--commit-every", "1", "--shards", *s) for s in (even, odd)
    ]
    for p in procs:
        _wait_ready(p)
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert not list(tmp_path.glob(".parallel.zarr.creating-*")), "the loser's temp folder is removed"
    st = _check_done_clips_complete(path)
    assert st.is_complete()
    expected_failed = [i for i in range(NUM_CLIPS) if expected_clip(i) is None]
    assert [r["index"] for r in st.failures()] == expected_failed
    assert int((st.status() == STATUS_DONE).sum()) == NUM_CLIPS - len(expected_failed)


def main() -> None:
    parser = argparse.ArgumentParser(description="writer process for the crash-safety tests")
    parser.add_argument("path", type=Path)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep before each clip")
    parser.add_argument("--commit-every", type=int, default=None)
    parser.add_argument("--shards", type=int, nargs="*", default=None)
    parser.add_argument("--die-before-status", type=int, default=0, help="SIGKILL itself in commit N")
    args = parser.parse_args()
    store = create(args.path)
    if args.die_before_status:
        _die_before_status_write(args.die_before_status)
    print("ready", flush=True)
    shards = args.shards if args.shards is not None else store.pending_shards()
    write(store, shards, args.delay, args.commit_every)


if __name__ == "__main__":
    main()
