"""The seams of issue 20: feature types from one registry, clip geometry resolved once (class count from the
dataset), one predictor interface, and ``amflow model-info``'s per-block geometry."""

import json

import pytest
import timm
import torch

from amflow.cli import main
from foundation.config import ConfigError
from stage1_extract.features import FEATURE_TYPES, build_feature_extractor
from stage1_extract.features.base import FeatureExtractor
from stage1_extract.methods.models import feature_config_from_dict, load_feature_config
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import DatasetConfig
from stage2_temporal.finetuning.plan import plan_finetune
from stage2_temporal.inference.predict import PREDICTORS, Predictor

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

TINY = "configs/models/amflow_tiny.yaml"
SMALL = ["backbone.timm_kwargs.depth=2", "backbone.img_size=32", "num_frames=4", "bottleneck=8"]


@pytest.mark.parametrize("maps, channels", [("am_flow", 3), ("feature_diff", 1)])
def test_each_feature_type_reports_the_shapes_it_extracts(maps, channels):
    cfg = load_feature_config(TINY, [*SMALL, f"maps={maps}"])
    model = build_feature_extractor(cfg)
    assert isinstance(model, FeatureExtractor) and type(model) is FEATURE_TYPES[maps]
    layout = model.layout()
    timm_vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0)
    grid = tuple(timm_vit.patch_embed.grid_size)
    assert [(b.grid, b.prefix_tokens, b.heads, b.width) for b in layout.flow_geometry] == [
        (grid, 1, timm_vit.blocks[0].attn.num_heads, timm_vit.embed_dim)
    ] * 2
    assert [b.channels for b in layout.flow_geometry] == [channels, channels]
    with torch.no_grad():
        f = model.extract(torch.randn(2, 4, 3, 32, 32))
    assert f.embeddings.shape == (2, len(layout.adapter_names), 4, layout.embed_dim)
    assert f.cls.shape == (2, layout.cls_dim)
    assert f.flow.shape == (2, 2, 4, channels, 1 + grid[0] * grid[1])


def test_stage1_reads_its_own_keys_and_catches_typos():
    data = {"kind": "amflow", "num_frames": 4, "num_classes": 3, "heads": {"type": "lstm"}}
    cfg = feature_config_from_dict(data, "m.yaml")
    assert cfg.num_frames == 4 and not hasattr(cfg, "heads")
    with pytest.raises(ConfigError, match="m.yaml: unknown key 'aggregaton'; did you mean 'aggregation'"):
        feature_config_from_dict({**data, "aggregaton": "softmax_sum"}, "m.yaml")
    with pytest.raises(ConfigError, match="z.yaml: kind 'videomae' selects feature type 'videomae', which"):
        feature_config_from_dict({"kind": "videomae"}, "z.yaml")
    assert feature_config_from_dict({"kind": "zeroi2v", "num_frames": 4}, "z.yaml").num_frames == 4


def test_clip_geometry_is_resolved_in_one_place():
    model = load_feature_config(TINY, SMALL)
    data = DatasetConfig(num_frames=4, num_clips=2, num_crops=3)
    geometry = ClipGeometry.resolve(data, model, "m.yaml", class_names=["a", "b"])
    assert (geometry.crop_size, geometry.num_views, geometry.num_classes) == (32, 6, 2)  # crop = img_size
    assert geometry.with_crop(data).crop_size == 32
    with pytest.raises(ConfigError, match="m.yaml: num_frames=4 but dataset 'folder' samples num_frames=8"):
        ClipGeometry.resolve(DatasetConfig(num_frames=8), model, "m.yaml")
    with pytest.raises(ConfigError, match="backbone.img_size=32 but dataset 'folder' crops crop_size=48"):
        ClipGeometry.resolve(DatasetConfig(num_frames=4, crop_size=48), model, "m.yaml")
    mean, std = geometry.normalisation(build_feature_extractor(model).backbone)
    assert mean.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])  # timm's ViT-Tiny pretrained_cfg
    assert ClipGeometry(4, 32, pixel_mean=(0.1, 0.2, 0.3)).pixel_mean == (0.1, 0.2, 0.3)


def test_finetuning_smarthome_cv1_takes_its_19_classes_from_the_dataset(tmp_path):
    for name in ("Cutbread_p03_r00_v01_c01", "Walk_p04_r00_v02_c01", "Enter_p09_r00_v01_c05"):
        (tmp_path / f"{name}.mp4").write_bytes(b"")  # only the names are read to plan
    plan = plan_finetune(
        "smarthome",
        tmp_path,
        TINY,
        protocol="cv1",
        recipe="configs/finetune/tiny.yaml",
        overrides=["num_frames=8"],
    )
    assert plan.model.num_classes == 19 and plan.geometry.num_classes == 19  # the tiny config says 4
    assert plan.geometry.class_names[0] == "Cutbread" and plan.geometry.crop_size == 64
    with pytest.raises(ConfigError, match="model.num_classes=31 but smarthome split 'train' has 19 classes"):
        plan_finetune("smarthome", tmp_path, TINY, protocol="cv1", overrides=["model.num_classes=31"])


def test_every_predictor_source_has_one_interface():
    assert set(PREDICTORS) == {"heads", "finetune", "merged"}
    assert all(issubclass(p, Predictor) and p.kind == k for k, p in PREDICTORS.items())
    with pytest.raises(TypeError, match="abstract"):
        Predictor(torch.nn.Linear(1, 1), DatasetConfig(crop_size=32), ["a"], {})


def test_model_info_lists_the_family_and_each_blocks_geometry(capsys):
    capsys.readouterr()
    argv = ["model-info", "--config", TINY, "--json", "backbone.timm_kwargs.depth=3"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "TimmViT"
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=3, num_classes=0)
    expected = {"grid": list(vit.patch_embed.grid_size), "tokens": 65, "heads": 3, "width": 192}
    assert [{k: b[k] for k in expected} for b in report["blocks"]] == [expected] * 3
    assert main(["model-info", "--config", TINY, "backbone.timm_kwargs.depth=3"]) == 0
    out = capsys.readouterr().out
    assert "family TimmViT" in out and "1-3" in out and "8x8" in out
