"""Reading and writing checkpoint folders in their published layouts.

All loaders go through `load_state_dict_checked`, which compares the keys and shapes of a state
dict with the module *before* copying anything, so a mismatching checkpoint fails as a whole with
the first offending keys named, and no partially loaded model ever escapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from neodragon_cli.atomic import save_safetensors, write_json
from neodragon_cli.errors import CheckpointError

_SHOWN = 5


def read_config(folder: str | Path, filename: str = "config.json") -> dict:
    path = Path(folder) / filename
    if not path.is_file():
        raise CheckpointError(f"no {filename} in {folder}", hint="point at a checkpoint folder in its published layout")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def config_kwargs(config: dict, allowed: set[str]) -> dict:
    """The constructor arguments from an HF-style config.json (keys starting with '_' are metadata)."""
    return {k: v for k, v in config.items() if k in allowed}


def find_file(folder: str | Path, candidates: tuple[str, ...]) -> Path:
    folder = Path(folder)
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"none of {', '.join(candidates)} found in {folder}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file does not exist: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad/unsafe file
        raise CheckpointError(f"cannot read {path} with weights_only=True: {exc}") from None
    return obj


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing / unexpected / wrongly shaped keys."""
    expected = module.state_dict()
    persistent = set(expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in persistent]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_listing(shapes)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match {type(module).__name__}: " + "; ".join(problems),
            hint="check that the folder and the config belong together",
        )


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    check_state_dict(module, state, source=source)
    module.load_state_dict(state, strict=True)
    return module


def save_folder(folder: str | Path, config: dict, state: dict[str, torch.Tensor], weights_name: str) -> None:
    """Write config.json + weights (safetensors) atomically into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, folder / weights_name)
    write_json(folder / "config.json", config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
