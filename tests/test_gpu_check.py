"""``benchmarks/gpu_check.py --cpu-smoke``: the GPU run's code end to end on the CPU with tiny models, so the
script cannot rot between the rare runs on a GPU machine. Its figures are not checked (timings of tiny
models on a shared CPU); that every part ran and reported is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("env", "cuda_tests", "backbone", "compile", "decode", "extract", "zeroi2v", "finetune", "stage2")


def test_cpu_smoke_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    reports = list(tmp_path.glob("gpu-cpu-smoke-*.md"))
    assert len(reports) == 1, proc.stderr[-3000:]
    text = reports[0].read_text()
    for part in PARTS:
        assert f"## {part}: " in text, part
        assert f"| {part} | ok |" in text, (part, text[:3000])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MFU" in text and "after / before per core" in text and "merged / plain" in text
    cuda_section = text.split("## cuda_tests: ")[1].split("## ")[0]
    assert "exit 0" in cuda_section and "skipped" in cuda_section  # they ran, and skipped without a GPU


def test_a_failing_part_is_recorded_and_the_report_still_written(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    report = gpu_check.Report(tmp_path / "r.md", ["# header"])

    def broken() -> list[str]:
        raise RuntimeError("CUDA error: out of memory\nsecond line")

    def failing_with_figures() -> list[str]:
        raise gpu_check.PartFailed("pytest -m cuda: 1 failed, 7 passed", ["- FAILED tests/test_cuda.py::x"])

    gpu_check.run_part(report, "finetune", "finetuning", broken, limit_s=30)
    gpu_check.run_part(report, "cuda_tests", "tests", failing_with_figures, limit_s=30)
    gpu_check.run_part(report, "stage2", "heads", lambda: ["| a |"], limit_s=30)
    text = (tmp_path / "r.md").read_text()
    assert "| finetune | failed |" in text and "`RuntimeError: CUDA error: out of memory`" in text
    assert "second line" not in text  # one line per failure
    assert "| cuda_tests | failed |" in text and "- FAILED tests/test_cuda.py::x" in text
    assert "| stage2 | ok |" in text and "| a |" in text  # the next part ran
    assert gpu_check.bf16_peak("NVIDIA H200") == 989e12 and gpu_check.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.bf16_peak("some cpu") is None
