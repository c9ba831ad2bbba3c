"""Reading and writing checkpoint files in their published layouts.

`read_state_dict` turns any weight file (safetensors or a torch file read with weights_only=True) into
a flat {key: tensor} dict or raises CheckpointError naming the file; `check_state_dict` compares the
keys and shapes of a state dict with a module *before* anything is copied, so a mismatching
checkpoint fails as a whole with the first offending keys named. `PretrainedModel` (base.py) builds
its loading and saving on these.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from neodragon_cli.atomic import save_safetensors, write_json
from neodragon_cli.errors import CheckpointError

_SHOWN = 5
_REASON_CHARS = 120


def read_config(folder: str | Path, filename: str = "config.json") -> dict:
    path = Path(folder) / filename
    if not path.is_file():
        raise CheckpointError(f"no {filename} in {folder}", hint="point at a checkpoint folder in its published layout")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def find_file(folder: str | Path, candidates: tuple[str, ...]) -> Path:
    folder = Path(folder)
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"none of {', '.join(candidates)} found in {folder}")


def _reason(exc: Exception) -> str:
    """The first line of a reader's exception, shortened (torch's messages run to paragraphs)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= _REASON_CHARS else first[: _REASON_CHARS - 3] + "..."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or of a torch file (read with weights_only=True; a
    `{"state_dict": {...}}` wrapper, as aimet-model-zoo files have, is unwrapped).

    A truncated, corrupt or non-tensor file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file does not exist: {path}")
    hint = "the file is truncated or corrupt: download or copy it again"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        raise CheckpointError(f"{path} is not a valid checkpoint file ({_reason(exc)})", hint=hint) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a valid checkpoint file (it holds no flat state dict of tensors)")
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
    """Copy `state` into an existing (materialised) module after checking every key and shape."""
    check_state_dict(module, state, source=source)
    module.load_state_dict(state, strict=True)
    return module


# ---------------------------------------------------------------------------------------------------
# tied parameters: published files store a tied tensor once


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """{duplicate name: first name} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def with_tied_keys(state: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """`state` with each tied tensor present under all of its names (it may be stored under either)."""
    state = dict(state)
    for duplicate, source in aliases.items():
        if duplicate not in state and source in state:
            state[duplicate] = state[source]
        elif source not in state and duplicate in state:
            state[source] = state[duplicate]
    return state


def load_tied_checked(module: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> nn.Module:
    """Checked strict copy into an existing module that accepts a tied tensor under either of its names."""
    return load_state_dict_checked(module, with_tied_keys(state, tied_aliases(module)), source=source)


def untied_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor stored once (under its first name), as published files are."""
    aliases = tied_aliases(module)
    return {k: v for k, v in module.state_dict().items() if k not in aliases}


def save_folder(folder: str | Path, config: dict, state: dict[str, torch.Tensor], weights_name: str) -> None:
    """Write config.json + weights (safetensors) atomically into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, folder / weights_name)
    write_json(folder / "config.json", config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
