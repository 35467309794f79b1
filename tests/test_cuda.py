"""The CUDA paths (marker ``cuda``; skipped without a GPU): bf16 extraction against fp32, bf16 finetuning
of AM flow and ZeroI2V, stage-2 heads on the GPU, DDP over NCCL, NVDEC decoding, torch.compile.

Run on a GPU machine with ``pytest -m cuda tests/test_cuda.py`` (``benchmarks/gpu_check.py`` does)."""

from __future__ import annotations

import csv
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stage1_extract  # noqa: F401  (before timm)
from stage1_extract.extraction.extract import _forward
from stage1_extract.families.backbone import pixel_stats
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.finetuning.models import build_amflow, load_model_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:.*randomly initialised"),
]

# bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation); through 12 blocks of a random-init
# ViT-B the features drift by ~1%. Stated tolerance: relative L2 error <= 3% per feature array, and
# AM-flow maps (softmax probabilities) within 0.02 absolute.
BF16_RELATIVE_L2 = 0.03
BF16_FLOW_ABS = 0.02


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """16 training and 8 validation clips of 4 motion classes at 32 px."""
    root = tmp_path_factory.mktemp("videos")
    make_folder_dataset(root, ["left", "right", "up", "down"], {"train": 4, "val": 2}, 32, 8, seed=0)
    return root


@pytest.mark.parametrize("config", ["amflow_vitb14_dinov2_am12_lstm", "amflow_vitb14_dinov2_am2_lstm"])
def test_extraction_bf16_matches_fp32(config):
    """The extraction forward (``_forward``, bf16 autocast on CUDA) against the same forward in fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_model_config(f"configs/models/{config}.yaml")
    model = build_amflow(cfg).eval().cuda()
    mean, std = pixel_stats(model.vit, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (2, 3, 8, 3, 224, 224), generator=g, dtype=torch.uint8)  # (B, V, T, ...)
    bf16 = _forward(model, video.pin_memory(), mean, std, "cuda", on_cuda=True)
    fp32 = _forward(model, video, mean, std, "cuda", on_cuda=False)  # autocast off: fp32 on the GPU
    for key in ("embeddings", "cls"):
        assert np.isfinite(bf16[key]).all()
        assert relative_l2(bf16[key], fp32[key]) <= BF16_RELATIVE_L2, key
    assert np.abs(bf16["flow"] - fp32["flow"]).max() <= BF16_FLOW_ABS


def _loss_curve(out) -> list[float]:
    with open(out / "steps.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize(
    "config, extra",
    [
        ("amflow_tiny", ["model.heads.hidden=16", "model.heads.flow_grid=4"]),
        ("zeroi2v_tiny", []),
    ],
)
def test_finetune_bf16_loss_finite_and_falling(videos, tmp_path, config, extra):
    """``finetune`` on the GPU with bf16 autocast (the recipe's precision): finite, falling loss."""
    from stage2_temporal.finetuning.finetune import finetune, plan_finetune

    common = ["model.backbone.img_size=32", "data.num_frames=4", "device=cuda", "epochs=6", "lr=0.003"]
    plan = plan_finetune(
        "folder", videos, f"configs/models/{config}.yaml", recipe="configs/finetune/tiny.yaml",
        overrides=[*common, *extra],
    )  # fmt: skip
    result = finetune(plan, tmp_path, progress=False)
    assert result.finished
    losses = _loss_curve(tmp_path)
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < first, (first, last)


def test_stage2_heads_train_on_the_gpu(tmp_path):
    """Paper-size LSTM heads (3 layers, 768) on a small random cache: trained on CUDA, loss falls."""
    from stage2_temporal.heads import LSTMHeadsConfig
    from stage2_temporal.training.config import TrainConfig
    from stage2_temporal.training.data import CachedFeatures
    from stage2_temporal.training.train import train_heads

    rng = np.random.default_rng(0)
    labels = np.arange(64) % 4
    embeddings = rng.standard_normal((64, 1, 2, 8, 64), dtype=np.float32)
    embeddings[np.arange(64), 0, 0, :, labels] += 3.0  # a learnable signal
    data = CachedFeatures(
        embeddings=embeddings.astype(np.float16),
        cls=rng.standard_normal((64, 1, 64), dtype=np.float32).astype(np.float16),
        labels=labels,
        num_classes=4,
        adapter_names=["block1", "block12"],
        source="<random>",
    )
    cfg = TrainConfig(
        heads=LSTMHeadsConfig(hidden=768, layers=3), epochs=8, batch_size=16, warmup_epochs=1,
        patience=None, device="cuda",
    )  # fmt: skip
    metrics = train_heads(data, data, cfg, tmp_path, progress=False)
    assert metrics["device"].startswith("cuda")
    assert np.isfinite(metrics["final_train_loss"]) and metrics["final_train_loss"] < np.log(4)  # < chance
    assert metrics["val"]["top1"] > 0.5  # 4 classes: chance is 0.25


def _nccl_rank(rank: int, world: int, store: str, result: dict) -> None:
    """DDP over NCCL: a bf16 AM-flow step on (rank)'s GPU; rank 0 reports the all-reduced gradient."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    warnings.filterwarnings("ignore")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = load_model_config("configs/models/amflow_tiny.yaml")
        torch.manual_seed(0)
        model = build_amflow(cfg).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        g = torch.Generator(device="cuda").manual_seed(rank)
        video = torch.randn(2, cfg.num_frames, 3, 64, 64, device="cuda", generator=g)
        labels = torch.tensor([0, 1], device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(ddp(video).float(), labels)
        loss.backward()
        grad = next(p.grad for p in model.parameters() if p.grad is not None).float()
        gathered = [torch.zeros_like(grad) for _ in range(world)]
        dist.all_gather(gathered, grad)
        if rank == 0:
            result["same_on_every_rank"] = all(torch.equal(gathered[0], x) for x in gathered)
            result["finite"] = bool(torch.isfinite(grad).all())
    finally:
        dist.destroy_process_group()


def test_ddp_over_nccl(tmp_path):
    """DDP with NCCL over every GPU present (a 1-process group on a 1-GPU machine): gradients all-reduced."""
    world = torch.cuda.device_count()
    manager = mp.get_context("spawn").Manager()
    result = manager.dict()
    context = mp.start_processes(
        _nccl_rank, args=(world, str(tmp_path / "store"), result), nprocs=world, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the NCCL ranks did not finish within 180 s")
    assert result["finite"] and result["same_on_every_rank"]


def test_nvdec_decoding_matches_cpu_decoding(tmp_path):
    """``--decode-device cuda``: NVDEC frames against the CPU decoder's (same H.264 pictures; the NV12
    conversion may round differently: within 3 levels of 255 on average 0.5)."""
    from stage1_extract.videos import video
    from stage1_extract.videos.decode_plan import cuda_decode_problem
    from stage1_extract.videos.synthetic_k400 import write_k400_like_video

    path = write_k400_like_video(tmp_path / "clip.mp4", size=(96, 128), seconds=2, gop=20)
    problem = cuda_decode_problem(path)
    if problem is not None:
        pytest.skip(f"NVDEC through PyAV is not usable on this machine: {problem}")
    idx = np.array([[3, 17, 29, 44, 58]])
    cpu = video.planned_frames(path, 64, lambda n: idx).astype(np.int16)
    gpu = video.planned_frames(path, 64, lambda n: idx, hwaccel="cuda").astype(np.int16)
    assert gpu.shape == cpu.shape
    assert np.abs(gpu - cpu).max() <= 3 and np.abs(gpu - cpu).mean() <= 0.5


def test_compiled_extraction_matches_eager():
    """``--compile``: torch.compile of the extraction forward gives the eager features (bf16 tolerance)."""
    cfg = load_model_config("configs/models/amflow_tiny.yaml")
    model = build_amflow(cfg).eval().cuda()
    video = torch.randn(2, cfg.num_frames, 3, 64, 64, device="cuda")
    compiled = torch.compile(model.extract, dynamic=False)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager, fast = model.extract(video), compiled(video)
    for key in ("embeddings", "cls"):
        a, b = getattr(fast, key).float().cpu().numpy(), getattr(eager, key).float().cpu().numpy()
        assert relative_l2(a, b) <= BF16_RELATIVE_L2, key
