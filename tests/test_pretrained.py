"""``backbone.pretrained: true``: timm's own download of the named tag, read from the HF hub's cache offline.

The test fills a hub cache (in tmp_path, in the hub's layout) with a small random model under a real
timm tag, then runs amflow in a fresh process with ``HF_HUB_OFFLINE=1``: nothing can be downloaded, so
the weights can only come from that cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's hub id: timm/<TAG>
KW = dict(img_size=32, patch_size=8, depth=2)
REPO_ROOT = Path(__file__).resolve().parent.parent


def fill_hub_cache(cache: Path, model: torch.nn.Module, repo: str = f"timm/{TAG}") -> Path:
    """Writes ``model`` where ``huggingface_hub`` looks for ``repo``'s main revision (models--org--name)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")
    config = {
        "architecture": TAG.split(".")[0],
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "token",
        "pretrained_cfg": {k: v for k, v in model.pretrained_cfg.items() if isinstance(v, (str, int, float))},
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot


def run_offline(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pretrained_tag_from_the_offline_hub_cache(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model(TAG.split(".")[0], num_classes=1000, **KW).eval()
    fill_hub_cache(tmp_path / "hub", ref)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    result = run_offline(
        tmp_path,
        f"""
        import warnings, torch
        import stage1_extract
        from stage1_extract.families.backbone import WeightsError, create_backbone
        from stage2_temporal.finetuning.models import build_model, load_model_config

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no random-init warning: the weights are timm's tag
            vit = create_backbone({TAG!r}, 32, pretrained=True, patch_size=8, depth=2).eval()
        with torch.no_grad():
            features = vit.forward_features(torch.load({str(tmp_path / "x.pt")!r}))
        torch.save(features, {str(tmp_path / "f.pt")!r})
        cfg = load_model_config(
            "configs/models/amflow_tiny.yaml",
            ["backbone.name={TAG}", "backbone.pretrained=true", "backbone.img_size=32",
             "backbone.timm_kwargs.depth=2", "blocks=[1]"],
        )
        torch.save(build_model(cfg).vit.pos_embed.detach(), {str(tmp_path / "pos.pt")!r})
        try:  # a tag that is not in the cache cannot be downloaded offline: one clear error
            create_backbone("vit_small_patch16_224.augreg_in21k", 32, pretrained=True, depth=1)
        except WeightsError as e:
            print("ERROR:", e)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = ref.forward_features(x)
    got = torch.load(tmp_path / "f.pt")
    assert float((got - expected).norm() / expected.norm()) <= 1e-6
    assert torch.equal(torch.load(tmp_path / "pos.pt"), ref.pos_embed.detach())
    error = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert error and "vit_small_patch16_224.augreg_in21k" in error[0] and "offline" in error[0], result.stdout


def test_pretrained_and_weights_together_are_refused():
    from foundation.config import ConfigError
    from stage2_temporal.finetuning.models import load_model_config

    with pytest.raises(ConfigError, match="backbone.weights.*backbone.pretrained"):
        load_model_config(
            "configs/models/amflow_tiny.yaml", ["backbone.pretrained=true", "backbone.weights=w.safetensors"]
        )
