"""The torchvision fix acts only when the compiled ops fail to load (fake packages, any machine)."""

import subprocess
import sys
import textwrap


def run_with_fake(tmp_path, init_text: str) -> str:
    pkg = tmp_path / "fakevision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(init_text)
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from stage1_extract.torchvision_compat import ensure_torchvision_importable
        print(ensure_torchvision_importable("fakevision"))
        import fakevision
        print(fakevision.LOADED)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_acts_when_ops_are_missing(tmp_path):
    # Mimics torchvision: its import registers a fake kernel for an op its failed _C never defined.
    init = textwrap.dedent(
        """
        import torch
        for op in ("fake_op_a", "roi_magic"):
            torch.library.register_fake(f"torchvision::{op}")(lambda *a: None)
        LOADED = "yes"
        """
    )
    printed = run_with_fake(tmp_path, init)
    assert printed == ["['fake_op_a',", "'roi_magic']", "yes"]


def test_does_nothing_on_a_working_install(tmp_path):
    printed = run_with_fake(tmp_path, "LOADED = 'yes'\n")
    assert printed == ["[]", "yes"]


def test_real_torchvision_and_timm_import():
    code = (
        "import stage1_extract, timm, torchvision; print(timm.create_model('vit_tiny_patch16_224').embed_dim)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "192"
