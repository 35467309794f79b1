"""The aligner measurement (stage1_extract.methods.alignment) against the generator's known camera:
undoing the camera's move in pixels restores frame t exactly, an identity aligner leaves every figure as
no aligner, and the background's share of AM flow is small for a static camera and large for a panning one."""

import numpy as np
import pytest
import torch

from stage1_extract.families.backbone import normalise_video, pixel_stats
from stage1_extract.methods.alignment import aligners_bypassed, measure_alignment, undo_camera
from stage1_extract.videos.synthetic import render_motion_clip
from stage2_temporal.finetuning.models import build_model, load_model_config

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")
SIZE, T = 32, 4


def model(aligner: bool):
    overrides = [
        f"num_frames={T}",
        f"backbone.img_size={SIZE}",
        "backbone.timm_kwargs.depth=2",
        "blocks=[1,2]",
    ]
    overrides += [f"aligning_encoder={str(aligner).lower()}", "aligner_heads=3", "bottleneck=16"]
    return build_model(load_model_config("configs/models/amflow_tiny.yaml", overrides)).eval()


def clips(pan: bool):
    rendered = [
        render_motion_clip(m, size=SIZE, num_frames=T, rng=np.random.default_rng(k), pan=pan)
        for k, m in enumerate(["left", "right", "up", "down"])
    ]
    video = torch.stack([torch.from_numpy(c.frames).permute(0, 3, 1, 2) for c in rendered])
    return video, np.stack([c.camera for c in rendered]), np.stack([c.object_mask for c in rendered])


def test_undoing_the_camera_restores_the_previous_frame():
    base = torch.arange(2 * 3 * 8 * 10, dtype=torch.float32).reshape(2, 3, 8, 10)
    camera = np.array([[[0, 0], [1.2, -2.0], [3.0, -2.6]], [[0, 0], [-0.4, 0.3], [5.0, 9.0]]])
    video = torch.stack(
        [
            torch.stack([torch.roll(base[b], (round(y), round(x)), (-2, -1)) for y, x in camera[b]])
            for b in range(2)
        ]
    )
    pairs = undo_camera(video, camera)
    assert pairs.shape == (2, 2, 2, 3, 8, 10)
    assert torch.equal(pairs[:, :, 0], video[:, :-1])
    assert torch.equal(pairs[:, :, 1], pairs[:, :, 0])
    to_first = undo_camera(video, camera, reference="first")  # every frame back to frame 1's camera
    assert torch.equal(to_first[:, :, 0], video[:, :1].expand(-1, 2, -1, -1, -1))
    assert torch.equal(to_first[:, :, 1], to_first[:, :, 0])
    with pytest.raises(ValueError, match="camera"):
        undo_camera(video, camera[:, :2])


def test_identity_aligner_measures_as_no_aligner_and_the_true_shift_aligns():
    m = model(aligner=True)
    mean, std = pixel_stats(m.vit)
    ratios = {}
    for pan in (False, True):
        video, camera, mask = clips(pan)
        report = measure_alignment(m, normalise_video(video, mean, std), camera, mask)
        assert list(report) == ["block1", "block2"]
        for row in report.values():
            assert row["aligned"] == row["before"]  # the identity start
            assert row["flow_background_over_object_aligned"] == row["flow_background_over_object_bypassed"]
            if pan:
                assert row["true_shift"] < 0.7 * row["before"]  # undoing the camera brings tokens closer
            else:
                assert row["true_shift"] == row["before"]  # nothing to undo
        ratios[pan] = report["block1"]["flow_background_over_object_bypassed"]
    assert ratios[False] < 0.5 * ratios[True]  # a panning camera moves the background too


def test_bypassing_the_aligners_is_the_model_without_them():
    aligned, plain = model(aligner=True), model(aligner=False)
    plain.load_state_dict({k: v for k, v in aligned.state_dict().items() if ".aligner." not in k})
    for block in aligned.vit.blocks:  # move the aligners away from the identity
        torch.nn.init.normal_(block.aligner.layer.self_attn.out_proj.weight, std=0.5)
    video = normalise_video(clips(True)[0], *pixel_stats(plain.vit))
    with torch.no_grad():
        with aligners_bypassed(aligned):
            assert torch.equal(aligned.extract(video).flow, plain.extract(video).flow)
        assert not torch.equal(aligned.extract(video).flow, plain.extract(video).flow)
    with pytest.raises(ValueError, match="aligning_encoder"):
        measure_alignment(plain, video, np.zeros((4, T, 2)))


def test_alignment_loss_is_the_aligned_frames_distance_to_the_previous_frame():
    # At the identity start the aligned frame t+1 is x_{t+1}: the loss is the mean squared distance of
    # consecutive frames' normed patch tokens, computed here from captured block inputs.
    m = model(aligner=True).train()
    m.track_alignment()
    video = normalise_video(clips(True)[0], *pixel_stats(m.vit))
    captured = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: captured.append((_m, a[0]))) for b in m.vit.blocks]
    m(video)
    for h in hooks:
        h.remove()
    expected = []
    for block, x in captured:
        n = block.norm1(x.reshape(4, T, *x.shape[1:]))[:, :, 1:]
        expected.append((n[:, 1:] - n[:, :-1]).pow(2).mean())
    loss = m.alignment_loss()
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    loss.backward()  # the loss trains the aligners only, never the adapters before them
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".aligner." in n for n in grads)
    m.eval()
    with torch.no_grad():
        m(video)
    with pytest.raises(RuntimeError, match="alignment_loss"):
        m.alignment_loss()
