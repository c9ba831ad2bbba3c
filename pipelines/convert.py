"""Store an artifact's weights in another dtype (the embedded default ships as fp16).

Every floating tensor of every `.safetensors` file is cast (integer tensors and the files' metadata
are kept); every other file is copied as it is. The result is a new artifact whose chain records the
conversion, so `neodragon verify` ties the shipped bytes to the run they came from. Loading casts
back to the dtype a command asks for.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from neodragon_cli.artifacts import STATE_FILE, ArtifactWriter
from neodragon_cli.atomic import save_safetensors
from neodragon_cli.errors import CheckpointError, UsageError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _cast_file(src: Path, dest: Path, dtype: torch.dtype) -> tuple[int, int]:
    """Cast `src`'s floating tensors into `dest`; returns (tensors cast, tensors kept)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(src), framework="pt") as fh:
            metadata = fh.metadata()
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{src} is not a valid safetensors checkpoint ({exc})") from None
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(cast, dest, metadata=metadata)
    floating = sum(v.is_floating_point() for v in tensors.values())
    return floating, len(tensors) - floating


def convert_artifact(source: str | Path, out: str | Path, dtype: str, *, overwrite: bool = False) -> dict:
    """Write `out`: a copy of artifact folder `source` with its safetensors weights in `dtype`
    (fp16, bf16 or fp32). Returns the recorded results."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'", hint=f"use one of {', '.join(DTYPES)}")
    source = Path(source)
    with ArtifactWriter(out, command="convert", parent=source, overwrite=overwrite) as art:
        cast = kept = 0
        weight_files = []
        for src in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = src.relative_to(source)
            if rel.as_posix() == STATE_FILE:
                continue
            dest = art.path / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".safetensors":
                floating, others = _cast_file(src, dest, DTYPES[dtype])
                cast, kept = cast + floating, kept + others
                weight_files.append(rel.as_posix())
            else:
                shutil.copy2(src, dest)
        if not weight_files:
            raise UsageError(f"{source} holds no .safetensors weights to convert", hint="give a model artifact folder")
        results = {"dtype": dtype, "weight_files": weight_files, "tensors_cast": cast, "tensors_kept": kept,
                   "bytes_before": sum((source / f).stat().st_size for f in weight_files),
                   "bytes_after": sum((art.path / f).stat().st_size for f in weight_files)}
        art.record("convert", **results)
    return results
