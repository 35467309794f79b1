"""``amflow merge --onnx``: the merged ZeroI2V classifier run by onnxruntime gives PyTorch's logits, for
batch sizes other than the one it was traced with."""

import json

import numpy as np
import pytest
import torch

from amflow.cli import main
from foundation.config import load_config
from stage1_extract.methods.checkpoint import save_trainable_checkpoint
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v, load_merged

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("models/zeroi2v_tiny.yaml", ["backbone.img_size=32", "backbone.timm_kwargs.depth=2"]),
        ("models/zeroi2v_swin_tiny.yaml", ["backbone.img_size=32"]),  # shifted windows, 2 stages
    ],
)
def test_merged_classifier_in_onnxruntime_equals_pytorch(tmp_path, capsys, config, overrides):
    cfg = load_config(ZeroI2VConfig, config, overrides)
    model = build_zeroi2v(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking adapters and head, so the merge and the graph have work to do
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    ckpt = tmp_path / "best.safetensors"
    names = ["down", "left", "right", "up"]
    save_trainable_checkpoint(model, model.config, ckpt, {"class_names": json.dumps(names)})
    merged, graph = tmp_path / "merged.safetensors", tmp_path / "model.onnx"
    assert main(["merge", str(ckpt), "--out", str(merged), "--onnx", str(graph)]) == 0
    assert f"ONNX              {graph}" in capsys.readouterr().out

    onnx.checker.check_model(onnx.load(str(graph)))
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == names and meta["num_frames"] == "4"
    reference = ZeroI2VModel(*load_merged(merged)).eval()
    for batch in (1, 3):
        video = torch.randn(batch, 4, 3, 32, 32, generator=gen)
        (logits,) = session.run(None, {"video": video.numpy()})
        with torch.no_grad():
            expected = reference(video).numpy()
            unmerged = model.eval()(video).numpy()
        assert logits.shape == (batch, 4)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits, unmerged, rtol=1e-3, atol=1e-3)
