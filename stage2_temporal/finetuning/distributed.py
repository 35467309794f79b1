"""Distributed set-up of finetuning (``torchrun``: DistributedDataParallel, gloo on CPU, nccl on CUDA) and
the rank-independent split of every optimiser step's clips into this rank's micro-batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from foundation.devices import resolve_device
from stage2_temporal.finetuning.augment import derived_seed


@dataclass
class Distributed:
    """This process's place: rank, world size, local rank; ``owns_group`` when we initialised it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce sum of a CPU tensor, in place (a no-op in one process; via the GPU under nccl)."""
        if self.world_size > 1:
            if dist.get_backend() == "nccl":
                on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
                tensor.copy_(on_gpu.cpu())
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Joins the torchrun process group (``WORLD_SIZE`` > 1 in the environment) and picks this rank's device.

    nccl with one GPU per rank (``cuda:LOCAL_RANK``) when CUDA is used, else gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        wanted = torch.device("cuda", local)
        torch.cuda.set_device(wanted)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if wanted.type == "cuda" else "gloo")
    return Distributed(rank, world, local, owns), wanted


def epoch_order(num_clips: int, seed: int, epoch: int) -> torch.Tensor:
    """The clip order of an epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, 0x6F72646572))
    return torch.randperm(num_clips, generator=generator)


class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches (lists of clip indices) for optimiser steps ``start..stop`` of an epoch.

    Step s uses clips ``order[s*G : (s+1)*G]``; its micro-batch ``a`` of rank ``r`` is the slice number
    ``a * world + r`` of ``micro`` clips, so every clip of the step is read by exactly one rank.
    """

    def __init__(
        self, order: torch.Tensor, start: int, stop: int, micro: int, accumulation: int, dist_: Distributed
    ) -> None:
        self.order, self.start, self.stop = order, start, stop
        self.micro, self.accumulation, self.dist = micro, accumulation, dist_

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        G = self.micro * self.accumulation * self.dist.world_size
        for step in range(self.start, self.stop):
            clips = self.order[step * G : (step + 1) * G]
            for a in range(self.accumulation):
                part = a * self.dist.world_size + self.dist.rank
                yield clips[part * self.micro : (part + 1) * self.micro].tolist()
