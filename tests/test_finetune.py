"""End-to-end finetuning: the loss falls, a stopped run resumes to the same weights, DDP on 2 CPU processes
equals one process, checkpoints feed stage 1 extraction and the ZeroI2V merge; augmentation ops checked
against PIL."""

import argparse
import csv
import json
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image, ImageOps
from safetensors.torch import load_file

from amflow.commands import finetune as finetune_command
from foundation.config import ConfigError
from stage1_extract.extraction.extract import load_extraction_model
from stage1_extract.families import family_of
from stage1_extract.methods.checkpoint import load_into, load_trainable_checkpoint, read_config
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.finetuning import augment
from stage2_temporal.finetuning.distributed import Distributed, StepBatches, epoch_order
from stage2_temporal.finetuning.finetune import finetune
from stage2_temporal.finetuning.model import use_gradient_checkpointing
from stage2_temporal.finetuning.models import build_model, load_model_config, model_config_from_dict
from stage2_temporal.finetuning.plan import plan_finetune
from stage2_temporal.training.optim import adamw
from stage2_temporal.zeroi2v.model import ZeroI2VModel, load_merged, merge_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

TINY_RECIPE = "configs/finetune/tiny.yaml"
SMALL_AMFLOW = [
    "model.backbone.img_size=32",
    "model.backbone.timm_kwargs.depth=2",
    "model.bottleneck=16",
    "model.heads.hidden=16",
    "model.heads.flow_embed=16",
    "model.heads.flow_hidden=16",
    "model.heads.flow_grid=4",
    "num_frames=4",  # the dataset's and the model's
]
SMALL_ZEROI2V = ["model.backbone.img_size=32", "model.backbone.timm_kwargs.depth=2", "data.num_frames=4"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """16 training and 8 validation clips of 4 motion classes at 32 px."""
    root = tmp_path_factory.mktemp("videos")
    make_folder_dataset(root, ["left", "right", "up", "down"], {"train": 4, "val": 2}, 32, 8, seed=0)
    return root


def amflow_plan(videos, *extra):
    return plan_finetune(
        "folder",
        videos,
        "configs/models/amflow_tiny.yaml",
        recipe=TINY_RECIPE,
        overrides=[*SMALL_AMFLOW, *extra],
    )


def zeroi2v_plan(videos, *extra):
    return plan_finetune(
        "folder",
        videos,
        "configs/models/zeroi2v_tiny.yaml",
        recipe=TINY_RECIPE,
        overrides=[*SMALL_ZEROI2V, *extra],
    )


@pytest.fixture(scope="module")
def amflow_run(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("amflow_run")
    result = finetune(amflow_plan(videos, "epochs=6", "lr=0.003"), out, progress=False)
    return out, result


# Randomness everywhere: random clips and crops, RandAugment, random erasing, flips and adapter dropout.
ZEROI2V_RANDOM = ["epochs=2", "augment.randaugment_ops=2", "augment.random_erasing=0.5", "augment.flip=0.5"]


@pytest.fixture(scope="module")
def zeroi2v_run(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("zeroi2v_run")
    result = finetune(zeroi2v_plan(videos, *ZEROI2V_RANDOM), out, progress=False)
    return out, result


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def tensors_equal(a_path, b_path, atol=0.0):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ------------------------------------------------------------------------------------------------ training


def test_training_loss_falls_and_run_dir_is_complete(amflow_run):
    out, result = amflow_run
    assert result.finished and result.global_step == 6 * 4  # 16 clips / batch 4 = 4 steps per epoch
    losses = [float(r["loss"]) for r in read_csv(out / "steps.csv")]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])
    written = {p.name for p in out.iterdir()}
    assert written >= {"config.yaml", "last.safetensors", "best.safetensors", "resume.pt", "steps.csv"}
    assert written >= {"curve.csv", "curve.png", "confusion_val.csv", "confusion_val.png", "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    curve = read_csv(out / "curve.csv")
    assert len(curve) == 6 and metrics["epochs_run"] == 6
    best = max(range(6), key=lambda i: (float(curve[i]["val_mean_class_acc"]), -i))
    assert metrics["best_epoch"] == best + 1
    assert metrics["val"]["mean_class_acc"] == pytest.approx(float(curve[best]["val_mean_class_acc"]))
    assert metrics["val"]["num_clips"] == 8 and metrics["class_names"] == ["down", "left", "right", "up"]
    # The resolved config names the dataset's class and frame counts, and the recipe as overridden.
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["num_classes"] == 4 and resolved["model"]["num_frames"] == 4
    assert resolved["finetune"]["lr"] == 0.003 and resolved["val_split"] == "val"
    # The best checkpoint holds only what training changes: no frozen backbone weight.
    state, cfg = load_trainable_checkpoint(out / "best.safetensors")
    assert cfg["kind"] == "amflow" and cfg["num_classes"] == 4
    assert not any(k.startswith("vit.blocks.0.attn.qkv") or k == "vit.pos_embed" for k in state)
    assert any(".adapter_attn." in k for k in state) and any(k.startswith("classifier.") for k in state)


def test_best_checkpoint_scores_what_metrics_json_reports(amflow_run, videos):
    """The best checkpoint, reloaded and run on the validation clips, gives the reported accuracy."""
    from stage1_extract.videos.video import VideoClipDataset
    from stage2_temporal.finetuning.model import evaluate_clips
    from stage2_temporal.training.train import score

    out, result = amflow_run
    plan = amflow_plan(videos)
    state, cfg = load_trainable_checkpoint(out / "best.safetensors")
    model = build_model(model_config_from_dict(cfg))
    load_into(model, state, out / "best.safetensors")
    dataset = VideoClipDataset(plan.val.records, videos, plan.geometry)
    probs, decoded = evaluate_clips(model, dataset, 4, 3, torch.device("cpu"), None, Distributed())
    labels = np.array([r.label for r in plan.val.records])
    assert decoded.all()
    assert score(probs, labels, 4)["mean_class_acc"] == pytest.approx(result.metrics["val"]["mean_class_acc"])


def test_finetuned_adapters_feed_stage1_extraction(amflow_run):
    out, _ = amflow_run
    ckpt = out / "best.safetensors"
    cfg = model_config_from_dict(read_config(ckpt))
    trained = load_extraction_model(cfg, str(ckpt), torch.device("cpu"))
    fresh = load_extraction_model(cfg, None, torch.device("cpu"))
    state, _ = load_trainable_checkpoint(ckpt)
    for key in ("vit.blocks.0.adapter_attn.down.weight", "vit.blocks.1.adapter_mlp.up.weight"):
        assert torch.equal(trained.state_dict()[key], state[key])
        assert not torch.equal(fresh.state_dict()[key], state[key])  # training moved them
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = trained.extract(video), fresh.extract(video)
    assert a.embeddings.shape == b.embeddings.shape
    assert (a.embeddings - b.embeddings).abs().max() > 1e-3
    assert (a.cls - b.cls).abs().max() > 1e-4  # W_up is no longer zero: the tokens changed too


def test_one_finetuning_step_moves_the_aligning_encoder(videos, tmp_path):
    # The aligner starts as the identity (zero last layers); one optimiser step of the classification
    # loss must already move its output projections, so it is trained end to end.
    plan = amflow_plan(videos, "model.aligning_encoder=true", "model.aligner_heads=3", "model.blocks=[1]")
    fresh = build_model(plan.model).state_dict()
    finetune(plan, tmp_path / "run", stop_after_steps=1, progress=False, tensorboard=False)
    state, _ = load_trainable_checkpoint(tmp_path / "run" / "last.safetensors")
    moved = {k for k, v in state.items() if ".aligner." in k and not torch.equal(v, fresh[k])}
    layer = "vit.blocks.0.aligner.layer."
    assert {layer + "self_attn.out_proj.weight", layer + "linear2.weight"} <= moved
    assert not fresh[layer + "linear2.weight"].any() and state[layer + "linear2.weight"].any()


def test_auxiliary_alignment_loss_adds_to_the_first_step_and_needs_an_aligner(videos, tmp_path):
    # At the identity start the classification loss is the same with or without the auxiliary term, so
    # the first step's logged loss grows by the (positive) weighted alignment error.
    aligner = ["model.aligning_encoder=true", "model.aligner_heads=3", "model.blocks=[1]"]
    losses = []
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        plan = amflow_plan(videos, *aligner, f"aligner_loss_weight={weight}")
        finetune(plan, out, stop_after_steps=1, progress=False, tensorboard=False)
        losses.append(float(read_csv(out / "steps.csv")[0]["loss"]))
    assert losses[1] > losses[0] + 1e-3
    with pytest.raises(ConfigError, match="aligner_loss_weight.*aligning_encoder"):
        amflow_plan(videos, "aligner_loss_weight=1.0")


def test_stopped_run_resumes_to_the_same_weights(zeroi2v_run, videos, tmp_path):
    """Stop after 3 steps (mid-epoch), resume, stop after 6 (next epoch, past a validation), resume to
    the end: the weights, losses and curve equal the uninterrupted run's bit for bit."""
    reference, ref_result = zeroi2v_run
    plan = zeroi2v_plan(videos, *ZEROI2V_RANDOM)
    first = finetune(plan, tmp_path, stop_after_steps=3, progress=False)
    assert not first.finished and first.global_step == 3
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "best.safetensors").exists()
    second = finetune(plan, tmp_path, resume=True, stop_after_steps=6, progress=False)
    assert second.global_step == 6 and (tmp_path / "best.safetensors").exists()
    final = finetune(plan, tmp_path, resume=True, progress=False)
    assert final.finished and final.global_step == ref_result.global_step == 8
    tensors_equal(tmp_path / "last.safetensors", reference / "last.safetensors")
    tensors_equal(tmp_path / "best.safetensors", reference / "best.safetensors")
    assert read_csv(tmp_path / "steps.csv") == read_csv(reference / "steps.csv")
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in read_csv(tmp_path / "curve.csv")]
    assert drop_time == [
        {k: v for k, v in r.items() if k != "seconds"} for r in read_csv(reference / "curve.csv")
    ]
    # A run that started from scratch differs: the equality above is not trivially true.
    other = finetune(
        zeroi2v_plan(videos, *ZEROI2V_RANDOM, "train.seed=1"), tmp_path / "other", progress=False
    )
    assert other.finished
    a, b = (
        load_file(str(tmp_path / "other" / "last.safetensors")),
        load_file(str(reference / "last.safetensors")),
    )
    assert not torch.equal(a["head.fc.weight"], b["head.fc.weight"])


def test_resume_state_of_the_first_format_is_converted(zeroi2v_run, videos, tmp_path):
    """A resume.pt of the first format (one flat dict, the epoch's sums as a list, a LambdaLR state, every
    parameter in one AdamW group in model order) resumes to the uninterrupted run's weights."""
    reference, _ = zeroi2v_run
    plan = zeroi2v_plan(videos, *ZEROI2V_RANDOM)
    finetune(plan, tmp_path, stop_after_steps=3, progress=False)
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert saved["format"] == "amflow-finetune-resume-2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(plan.model)
    model_order = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    grouped = [model_order[id(p)] for g in adamw(model, 1e-3, 0.05).param_groups for p in g["params"]]
    sums = ("epoch_loss_sum", "epoch_correct", "epoch_clips")
    first_format = {
        "format": "amflow-finetune-resume-1",
        **{k: v for k, v in saved["state"].items() if k not in sums},
        "epoch_sums": [saved["state"][k] for k in sums],
        "optimizer": {
            "state": {grouped[i]: s for i, s in saved["optimizer"]["state"].items()},
            "param_groups": [{**saved["optimizer"]["param_groups"][1], "params": list(range(len(grouped)))}],
        },
        "scheduler": {"base_lrs": [1e-3], "last_epoch": 3, "_step_count": 4, "lr_lambdas": [None]},
    }
    torch.save(first_format, tmp_path / "resume.pt")
    assert finetune(plan, tmp_path, resume=True, progress=False).finished
    tensors_equal(tmp_path / "last.safetensors", reference / "last.safetensors")
    assert read_csv(tmp_path / "steps.csv") == read_csv(reference / "steps.csv")


def test_resume_and_overwrite_guards(zeroi2v_run, videos, tmp_path):
    reference, _ = zeroi2v_run
    with pytest.raises(ValueError, match="already finished"):
        finetune(zeroi2v_plan(videos, *ZEROI2V_RANDOM), reference, resume=True, progress=False)
    with pytest.raises(ValueError, match="--resume to continue it or --overwrite"):
        finetune(zeroi2v_plan(videos, *ZEROI2V_RANDOM), reference, progress=False)
    finetune(zeroi2v_plan(videos, *ZEROI2V_RANDOM), tmp_path, stop_after_steps=1, progress=False)
    with pytest.raises(ConfigError, match=r"finetune\.lr: 0\.001 -> 0\.002"):
        finetune(zeroi2v_plan(videos, *ZEROI2V_RANDOM, "lr=0.002"), tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no resume.pt"):
        finetune(zeroi2v_plan(videos), tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(ConfigError, match="batch_size 6 is not a multiple of micro_batch_size 4"):
        finetune(zeroi2v_plan(videos, "batch_size=6", "micro_batch_size=4"), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="backbone.img_size=32 but dataset 'folder' crops crop_size=48"):
        zeroi2v_plan(videos, "data.crop_size=48")


def test_finetuned_zeroi2v_checkpoint_merges(zeroi2v_run, tmp_path):
    """``amflow merge`` folds the finetuned adapters into a plain ViT with the same outputs."""
    out, _ = zeroi2v_run
    ckpt = out / "best.safetensors"
    summary = merge_checkpoint(ckpt, tmp_path / "merged.safetensors")
    assert summary.adapters_merged == 2 * 4  # 2 blocks x 4 places
    state, cfg = load_trainable_checkpoint(ckpt)
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith("adapter.up.weight"))
    unmerged = build_model(model_config_from_dict(cfg))
    load_into(unmerged, state, ckpt)
    merged = ZeroI2VModel(*load_merged(tmp_path / "merged.safetensors"))
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(merged(video), unmerged.eval()(video), atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_equals_one_large_batch(videos, tmp_path):
    """micro-batches of 4 accumulated twice = one batch of 8 (no randomness besides the data's)."""
    common = ["epochs=1", "batch_size=8"]
    finetune(amflow_plan(videos, *common), tmp_path / "one", progress=False)
    finetune(amflow_plan(videos, *common, "micro_batch_size=4"), tmp_path / "acc", progress=False)
    tensors_equal(tmp_path / "one" / "last.safetensors", tmp_path / "acc" / "last.safetensors", atol=1e-5)


def _ddp_rank(rank, world, store, videos, out, overrides):
    """One rank of the DDP test: the environment torchrun would set, a file-based store (no ports)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = finetune(amflow_plan(videos, *overrides), out, progress=False)
        assert result.finished and result.is_main == (rank == 0)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(videos, tmp_path):
    """2 CPU processes (gloo) with 4 clips each per step = one process with batch 8, random crops and flips
    included (they depend on the clip, not on the rank); validation is sharded and gathered."""
    extra = ["epochs=2", "batch_size=8", "augment.flip=0.5"]
    finetune(amflow_plan(videos, *extra), tmp_path / "one", progress=False)
    context = mp.start_processes(
        _ddp_rank,
        args=(2, str(tmp_path / "store"), videos, tmp_path / "ddp", extra),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP ranks did not finish within 240 s")
    tensors_equal(tmp_path / "ddp" / "last.safetensors", tmp_path / "one" / "last.safetensors", atol=1e-5)
    ddp, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert ddp["world_size"] == 2 and ddp["micro_batch"] == 4 and one["micro_batch"] == 8
    assert ddp["val"]["loss"] == pytest.approx(one["val"]["loss"], abs=1e-5)
    ddp_steps, one_steps = read_csv(tmp_path / "ddp" / "steps.csv"), read_csv(tmp_path / "one" / "steps.csv")
    assert [float(r["loss"]) for r in ddp_steps] == pytest.approx(
        [float(r["loss"]) for r in one_steps], abs=1e-5
    )


def test_finetune_command_stops_and_resumes(videos, tmp_path, capsys):
    """``amflow finetune`` (the command module): --stop-after-steps, then --resume to the end."""
    parser = argparse.ArgumentParser(prog="amflow")
    finetune_command.add_parser(parser.add_subparsers(dest="command"))
    argv = [
        "finetune",
        "--dataset",
        "folder",
        "--root",
        str(videos),
        "--config",
        "configs/models/zeroi2v_tiny.yaml",
    ]
    argv += ["--recipe", TINY_RECIPE, "--out", str(tmp_path / "run"), "--quiet", *SMALL_ZEROI2V, "epochs=1"]
    args = parser.parse_args([*argv, "--stop-after-steps", "2"])
    assert args.func(args) == 0
    assert "stopped after 2 steps; continue with --resume" in capsys.readouterr().out
    args = parser.parse_args([*argv, "--resume"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "best epoch 1 of 1" in printed and "mean class acc" in printed
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_steps"] == 4


def test_step_batches_partition_each_step_across_ranks_and_micro_batches():
    order = epoch_order(40, seed=3, epoch=2)
    assert torch.equal(order, epoch_order(40, seed=3, epoch=2))
    assert not torch.equal(order, epoch_order(40, seed=3, epoch=3))
    world, micro, accumulation = 2, 3, 2  # global batch 12: 3 steps of 40 clips, 4 dropped
    per_rank = [
        list(StepBatches(order, 1, 3, micro, accumulation, Distributed(rank=r, world_size=world)))
        for r in range(world)
    ]
    assert all(len(b) == 4 for b in per_rank)  # 2 steps x 2 micro-batches
    for step in range(2):
        got = [i for r in range(world) for b in per_rank[r][2 * step : 2 * step + 2] for i in b]
        assert sorted(got) == sorted(order[(step + 1) * 12 : (step + 2) * 12].tolist())


def test_gradient_checkpointing_gives_the_same_gradients(videos):
    cfg = load_model_config(
        "configs/models/amflow_tiny.yaml", [o[len("model.") :] for o in SMALL_AMFLOW[:-1]]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, checkpointed = build_model(cfg), build_model(cfg)
    assert use_gradient_checkpointing(checkpointed) == 2
    with torch.no_grad():
        for m in (plain, checkpointed):
            for blk in m.vit.blocks:
                blk.adapter_attn.up.weight.fill_(0.01)  # non-zero: gradients reach W_down
    video = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (plain, checkpointed):
        m(video).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and set(plain.state_dict()) == set(checkpointed.state_dict())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("config", "blocks"), [("amflow_tiny", 2), ("zeroi2v_tiny", 2), ("zeroi2v_swin_tiny", 4)]
)
def test_gradient_checkpointing_recomputes_every_block_in_backward(config, blocks):
    """timm's flag makes both models' block loops recompute each block in the backward pass: every block
    runs twice per training step with it, once without it, and once in inference either way."""
    small = ["backbone.img_size=32", "num_frames=4"]
    if "swin" not in config:
        small.append("backbone.timm_kwargs.depth=2")
    cfg = load_model_config(f"configs/models/{config}.yaml", small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg)
    calls = []
    for blk in family_of(model.vit).blocks(model.vit):
        blk.register_forward_pre_hook(lambda *_: calls.append(1))  # the recomputation may stop early
    video = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    counts = []
    for checkpointing in (False, True):
        model.vit.set_grad_checkpointing(checkpointing)
        calls.clear()
        model(video).sum().backward()
        counts.append(len(calls))
        calls.clear()
        with torch.no_grad():
            model(video)
        counts.append(len(calls))
    assert counts == [blocks, blocks, 2 * blocks, blocks]


# ---------------------------------------------------------------------------------------------- augment


def random_clip(seed, frames=3, size=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 3, size, size + 4), generator=g, dtype=torch.uint8)


def pil_frames(clip, op):
    out = [np.asarray(op(Image.fromarray(f.permute(1, 2, 0).numpy()))) for f in clip]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "name, magnitude, pil_op",
    [
        ("posterize", 3, lambda im: ImageOps.posterize(im, 3)),
        ("solarize", 100.0, lambda im: ImageOps.solarize(im, 100)),
        ("identity", 0.0, lambda im: im),
    ],
)
def test_randaugment_pointwise_ops_match_pil(name, magnitude, pil_op):
    clip = random_clip(0)
    got = augment.apply_randaugment_op(clip.float(), name, magnitude).round().to(torch.uint8)
    assert torch.equal(got, pil_frames(clip, pil_op))


def test_equalize_matches_pil_on_a_single_frame():
    clip = (random_clip(1, frames=1).float() * 0.4 + 60).round().to(torch.uint8)  # a narrow histogram
    got = augment.apply_randaugment_op(clip.float(), "equalize", 0.0).to(torch.uint8)
    assert torch.equal(got, pil_frames(clip, ImageOps.equalize))


def test_affine_ops_move_pixels_as_expected():
    clip = random_clip(2).float()
    shifted = augment.apply_randaugment_op(clip, "translate_x", 3 / clip.shape[-1])  # 3 pixels right
    assert torch.equal(shifted[..., 3:], clip[..., :-3]) and (shifted[..., :3] == 0).all()
    assert torch.equal(augment.apply_randaugment_op(clip, "rotate", 0.0), clip)
    square = random_clip(3, size=20)[..., :20].float()
    quarter = augment.apply_randaugment_op(square, "rotate", 90.0)
    assert torch.equal(quarter, torch.rot90(square, k=1, dims=(-2, -1))) or torch.equal(
        quarter, torch.rot90(square, k=-1, dims=(-2, -1))
    )


def test_augment_clip_is_a_function_of_its_generator_seed():
    cfg = augment.AugmentConfig(flip=0.5, randaugment_ops=3, randaugment_magnitude=9, random_erasing=0.5)
    clip = random_clip(4).unsqueeze(0)
    a = augment.augment_clip(clip, cfg, augment.item_generator(0, 1, 5))
    b = augment.augment_clip(clip, cfg, augment.item_generator(0, 1, 5))
    c = augment.augment_clip(clip, cfg, augment.item_generator(0, 2, 5))
    assert a.dtype == torch.uint8 and a.shape == clip.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every frame gets the same geometry: a static clip stays static.
    static = clip[:, :1].expand_as(clip).contiguous()
    out = augment.augment_clip(static, cfg, augment.item_generator(0, 1, 5))
    assert all(torch.equal(out[0, t], out[0, 0]) for t in range(out.shape[1]))


def test_flip_and_crop_box():
    clip = random_clip(5).unsqueeze(0)
    flip_only = augment.AugmentConfig(random_resized_crop=False, flip=1.0)
    assert torch.equal(augment.augment_clip(clip, flip_only, torch.Generator()), clip.flip(-1))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = augment.resized_crop_box(24, 28, [0.25, 1.0], [3 / 4, 4 / 3], g)
        assert 0 <= top <= 24 - h and 0 <= left <= 28 - w
        assert 0.2 <= h * w / (24 * 28) <= 1.0
    with pytest.raises(ConfigError, match="augment.crop_scale"):
        from foundation.config import build_config

        build_config(augment.AugmentConfig, {"crop_scale": [0.5, 2.0]})
