"""Process-group plumbing for training under `torchrun` (single node).

`torchrun --nproc_per_node N` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` reads them and starts
the default process group (nccl when CUDA is available, gloo on CPU). Without those variables
everything works as one process with rank 0 of a world of 1, so the same training code runs either way.
Commands run inside `process_group()`, which tears the group down however the block ends.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, rank on this node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | torch.device | None = None) -> DistEnv:
    """Start the process group if `torchrun` launched us (idempotent) and pick this rank's device.

    `device=None` picks `cuda:LOCAL_RANK` when CUDA is available, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(*, wait: bool = True) -> None:
    """Destroy the default process group, if one was started (call once, when training is over).

    `wait` first waits for every rank; pass False when leaving on an error, which the other ranks
    may never reach."""
    if dist.is_initialized():
        # Free finished collectives' work objects (and the tensors they hold) while the interpreter is
        # fully alive: gloo threads releasing them during interpreter shutdown abort the process
        # ("terminate called without an active exception") or hang it.
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


@contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[DistEnv]:
    """`setup(device)` for the block, and the process group it starts destroyed when the block ends,
    normally or by an exception (a group that was already running is left to its owner)."""
    owner = not dist.is_initialized()
    env = setup(device)
    try:
        yield env
    except BaseException:
        if owner:
            teardown(wait=False)
        raise
    if owner:
        teardown()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all ranks (the tensor itself when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on at least one rank (a stop request reaches every rank this way)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def fully_shard(module: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2's `fully_shard` over `mesh`, leaving out zero-element parameters (a Linear from a 0-wide
    pooled input): FSDP2's gradient reduce-scatter rejects empty tensors, and they hold nothing to shard
    or reduce."""
    from torch.distributed.fsdp import fully_shard as fsdp2_shard

    empty = {p for p in module.parameters() if p.numel() == 0}
    return fsdp2_shard(module, mesh=mesh, ignored_params=empty or None)


def shard_blocks(model: torch.nn.Module, mesh) -> None:
    """FSDP2 units over `mesh`: one per block of every outermost ModuleList in `model` (its transformer
    blocks; lists inside a block, such as T5's layers, stay in the block's unit). The caller shards the
    root (or a wrapper around it) last."""
    sharded: list[str] = []
    for name, container in model.named_modules():
        if not isinstance(container, torch.nn.ModuleList) or any(name.startswith(s + ".") for s in sharded):
            continue
        for index, block in enumerate(container):
            if not isinstance(block, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                fully_shard(block, mesh)
                sharded.append(f"{name}.{index}")


def split_rows(rows: int, rank: int, world_size: int) -> list[int]:
    """The rows rank `rank` computes when `rows` are shared over `world_size` ranks: every world_size-th
    row from `rank`, padded with the last row so every rank makes the same number of collective calls."""
    mine = list(range(rank, rows, world_size))
    share = -(-rows // world_size)
    return mine + [rows - 1] * (share - len(mine))


def gather_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """Every rank's `part` (its `split_rows`, in order) put back into the [rows, ...] whole, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return part[:rows]
    world = dist.get_world_size()
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part.contiguous())
    whole = torch.empty((rows, *part.shape[1:]), dtype=part.dtype, device=part.device)
    for rank, got in enumerate(parts):
        count = len(range(rank, rows, world))
        whole[rank::world] = got[:count]
    return whole


def rank_zero_first(make: Callable[[], T]) -> T:
    """`make()` on rank 0, then, after a barrier, on the other ranks: rank 0 writes what it makes (caches,
    tokenizer), the others find it written and read it."""
    is_main = setup().is_main
    if is_main:
        made = make()
    barrier()
    if not is_main:
        made = make()
    return made
