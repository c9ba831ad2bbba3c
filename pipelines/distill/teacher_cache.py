"""Teacher targets of text-encoder distillation, computed once into a sharded safetensors cache.

The real teacher (T5-XXL + context embedder) is 4.7 B parameters: it runs once over the prompts and
the student trains for many epochs on what it wrote. Shard k holds the targets of prompts
[k*S, (k+1)*S) as fp16 [n, length, D], trimmed to `length` tokens (the longest prompt of the corpus:
the loss reads valid tokens only). Each shard's metadata records the teacher's fingerprint and a digest
of its token ids and mask; a shard whose record matches is reused, any other is computed again, so an
interrupted run resumes where it stopped and a changed teacher, tokenizer or corpus is never mixed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from neodragon_cli.atomic import save_safetensors
from neodragon_cli.console import progress
from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.train import distributed

Teach = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TeacherTargets:
    """Token ids and mask [N, length] int64 and the teacher's outputs [N, length, D] fp16, row i = prompt i."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `rows` cut to their longest prompt: input_ids, attention_mask, target (float32)."""
        mask = self.attention_mask[rows]
        length = max(int(mask.sum(1).max()), 1)
        return {"input_ids": self.input_ids[rows, :length], "attention_mask": mask[:, :length],
                "target": self.targets[rows, :length].float()}


def teacher_fingerprint(modules: Iterable[nn.Module]) -> str:
    """sha256 of the teacher's weights (names, dtypes and bytes), in order."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _inputs_digest(ids: torch.Tensor, mask: torch.Tensor) -> str:
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.to(torch.int64).numpy().tobytes())
    digest.update(mask.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def stored_shard(path: Path, record: dict[str, str], name: str, what: str) -> torch.Tensor | None:
    """Tensor `name` of the safetensors cache shard `path` when its metadata equals `record`, else None
    (a missing shard or one written from other inputs). `what` names the cache in the error a damaged
    file raises."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as shard:
            return shard.get_tensor(name) if (shard.metadata() or {}) == record else None
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(f"{what} shard {path} is not a valid safetensors file ({exc})",
                              hint="delete it to compute it again") from None


def cached_teacher_targets(folder: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, teach: Teach,
                           fingerprint: str, *, shard_size: int, batch_size: int,
                           show_progress: bool = True) -> TeacherTargets:
    """Targets `teach(ids, mask)` of every row of `input_ids` / `attention_mask` [N, max_length] (the
    teacher sees them padded as at inference), read from the shards in `folder` that match and computed
    (no grad) and written for the others.

    Under torchrun every rank calls this: the ranks share the rows of each teacher batch
    (`distributed.split_rows`, the same number of teacher calls on every rank, as an FSDP-sharded teacher
    needs), every rank gets the whole result and rank 0 writes the shards."""
    length = max(int(attention_mask.sum(1).max()), 1)
    total = len(input_ids)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    starts = range(0, total, shard_size)
    records = [{"teacher": fingerprint, "inputs": _inputs_digest(input_ids[s:s + shard_size], attention_mask[s:s + shard_size]),
                "length": str(length)} for s in starts]
    paths = [folder / f"shard-{index:05d}.safetensors" for index in range(len(starts))]
    stored = [stored_shard(path, record, "targets", "teacher cache") for path, record in zip(paths, records)]
    distributed.barrier()  # every rank has looked before rank 0 writes anything
    parts = []
    with progress(disable=not show_progress or rank != 0) as bar:
        task = bar.add_task("teacher targets (prompts)", total=total)
        for start, path, record, targets in zip(starts, paths, records, stored):
            ids, mask = input_ids[start:start + shard_size], attention_mask[start:start + shard_size]
            if targets is None:
                batches = []
                with torch.no_grad():
                    for i in range(0, len(ids), batch_size):
                        rows = len(ids[i:i + batch_size])
                        mine = [i + r for r in distributed.split_rows(rows, rank, world)]
                        out = teach(ids[mine], mask[mine])[:, :length].float()
                        batches.append(distributed.gather_rows(out, rows).cpu())
                targets = torch.cat(batches).half()
                if rank == 0:
                    save_safetensors({"targets": targets}, path, metadata=record)
            parts.append(targets)
            bar.advance(task, len(ids))
    distributed.barrier()
    return TeacherTargets(input_ids[:, :length].long(), attention_mask[:, :length].long(), torch.cat(parts))
