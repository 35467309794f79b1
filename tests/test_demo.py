"""``amflow demo --quick`` end to end through the installed console script."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def amflow_executable() -> str:
    found = shutil.which("amflow") or str(Path(sys.executable).with_name("amflow"))
    assert Path(found).exists(), "the amflow console script is not installed"
    return found


def test_quick_demo_prints_the_table_and_am_flow_beats_the_frame_baseline(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [amflow_executable(), "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| (\([a-e]\)[^|]+?) \| +([\d.]+)% \| +([\d.]+)% \|$", done.stdout, flags=re.M)
    names = [r[0] for r in rows]
    assert [n[:3] for n in names] == ["(a)", "(b)", "(c)", "(d)", "(e)"], done.stdout
    assert "last-frame" in names[0] and "AM-flow map" in names[2] and "control" in names[4]
    for stage in ("generate videos", "extract (stage 1)", "train + evaluate heads (stage 2)"):
        assert re.search(rf"^\| {re.escape(stage)} \| [\d.]+ s \| [\d.]+ s \|$", done.stdout, flags=re.M)
    result = json.loads((out / "results.json").read_text())
    by_name = {r["name"]: r for r in result["rows"]}
    assert float(rows[2][1]) == round(100 * by_name[names[2]]["static"], 1)
    baseline, am_flow = by_name[names[0]]["static"], by_name[names[2]]["static"]
    assert am_flow > baseline + 0.15, done.stdout
    # Every stage's output exists: stores of both cameras and map kinds, run directories of every row.
    assert len(list((out / "stores").glob("*.zarr"))) == 2 * 2 * 3
    assert len(list((out / "runs").glob("*/row*/metrics.json"))) == 2 * 5
    # It ends with amflow predict on two test videos: the top-5 of each, as results.json records them.
    predicted = result["predictions"]["videos"]
    assert [Path(p["video"]).name for p in predicted] == ["left_0000.mp4", "up_0000.mp4"]
    tail = done.stdout[done.stdout.index(f"$ cd {out} && amflow predict") :]
    for p in predicted:
        assert len(p["top5"]) == 4 and sum(t["prob"] for t in p["top5"]) == pytest.approx(1.0, abs=1e-6)
        assert f"  1. {p['top5'][0]['label']:<8}{100 * p['top5'][0]['prob']:6.2f}%" in tail
    # Two fresh runs and a re-run write the same results.json: test_trust_demo_reproducible (--smoke).
