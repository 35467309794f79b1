"""The benchmarks that have no test of their own run end to end at toy sizes, so an API change in the
code they measure breaks a test instead of the next person who runs them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_store_throughput_prints_the_three_patterns(tmp_path):
    out = run(
        "store_throughput.py", "--clips", "12", "--adapters", "2", "--frames", "2", "--dim", "8",
        "--cls-dim", "4", "--shard-clips", "4", "--batch-size", "4", "--repeats", "1", "--dir", str(tmp_path),
    )  # fmt: skip
    assert "3 shards of 4 clips" in out
    for pattern in ("write (fsync'd)", "read whole store into memory", "shard-ordered batches of 4"):
        assert pattern in out


def test_train_views_prints_a_row_per_dataset_and_k(tmp_path):
    out = run(
        "train_views.py", "--out", str(tmp_path / "tv"), "--train-per-class", "1", "--val-per-class", "1",
        "--frames", "4", "--video-frames", "8", "--epochs", "2", "--views", "0,2", "--seeds", "1",
        "--rows", "c",
    )  # fmt: skip
    table = out[out.index("val mean acc") :].splitlines()[1:5]
    expected = [["demo", "0"], ["demo", "2"], ["varied", "0"], ["varied", "2"]]
    assert [line.split()[:2] for line in table] == expected
    assert not (tmp_path / "tv").exists()  # removed without --keep


def test_aligner_panning_quick_writes_table_json_and_picture(tmp_path):
    results = tmp_path / "results"
    out = run(
        "aligner_panning.py",
        "--quick",
        "--heads-on-finetuned",
        "--out",
        str(tmp_path / "work"),
        "--results",
        str(results),
    )
    table = (results / "aligner_panning.md").read_text()
    assert table.strip() in out
    for row in ("finetuned AM/2, no aligner", "finetuned AM/2, aligner", "(a) last-frame appearance"):
        assert row in table
    data = json.loads((results / "aligner_panning.json").read_text())
    assert {(r["camera"], r["variant"]) for r in data["finetune"]} == {
        (c, v) for c in ("static", "panning") for v in ("plain", "aligner")
    }
    assert all(0 <= r["test"] <= 1 for r in data["finetune"] + data["stage2"] + data["heads_on_finetuned"])
    # row (c) retrained on each finetuned model's own stored flow
    assert [(r["camera"], r["variant"]) for r in data["heads_on_finetuned"]] == [
        (r["camera"], r["variant"]) for r in data["finetune"]
    ]
    assert "row (c) heads on the flow of finetuned AM/2, aligner" in table
    fresh = [r for r in data["alignment"] if r["state"] == "fresh"]
    assert fresh and all(r["aligned"] == r["before"] > r["true_shift"] for r in fresh)  # identity start
    assert (results / "aligner_panning_flow.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "work").exists()  # removed without --keep


def test_aligner_oracle_quick_writes_a_row_per_condition(tmp_path):
    out = run("aligner_oracle.py", "--quick", "--results", str(tmp_path))
    data = json.loads((tmp_path / "aligner_oracle.json").read_text())
    assert list(data["results"]) == ["static", "panning, raw", "panning, pairwise true shift undone",
                                     "panning, pairwise exact", "panning, all frames to frame 1 exact",
                                     "panning, all frames undone to frame 1 (rolled)",
                                     "panning, aligner trained on the true shift (pairwise)",
                                     "panning, aligner trained on the true shift (to frame 1)"]  # fmt: skip
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in data["results"].values())
    assert all(np.sum(m) == 4 for m in data["confusion"].values())  # 1 test clip per class, 1 seed
    fresh = [row for states in data["alignment"].values() for row in states["fresh"].values()]
    assert len(fresh) == 4 and all(r["aligned"] == r["before"] for r in fresh)  # the identity start
    run(
        "aligner_oracle.py",
        "--quick",
        "--supervised-only",
        "--aligner-lr",
        "1e-3,1e-2",
        "--results",
        str(tmp_path),
    )
    rows = json.loads((tmp_path / "aligner_supervised.json").read_text())["rows"]
    assert [(r["reference"], r["lr"]) for r in rows[::2]] == [
        ("previous", 1e-3),
        ("previous", 1e-2),
        ("first", 1e-3),
        ("first", 1e-2),
    ]
    assert all(r["unaligned"] > 0 and r["aligned"] > 0 for r in rows)
    # copying the reference frame is a fixed answer: the same at every rate, not frame t+1's distance
    assert rows[0]["copy_reference"] == rows[2]["copy_reference"] != rows[0]["unaligned"]
    assert (tmp_path / "aligner_oracle.md").read_text().strip() in out


def test_store_checksums_prints_every_path(tmp_path):
    out = run("store_checksums.py", "--mib", "0.25", "--row", "64", "--repeats", "1", "--dir", str(tmp_path))
    for path in ("raw", "zarr", "zarr+crc32c", "crc32c only"):
        assert any(line.startswith(path + " ") for line in out.splitlines()), out
    assert "crc32c on Zarr's path: write x" in out
