"""`PretrainedModel`: the one base of every model family (MMDiT, VAEs, TAEHV, text encoders,
ContextAdapter, QuickSRNet).

* The constructor signature is the config: `self.config` is recorded from the arguments of the
  outermost `__init__` (JSON-ready: tuples become lists, transformers configs their `to_dict()`),
  before its body runs, so the body may read it.
* `from_pretrained(path, dtype=None, **overrides)` rejects unknown overrides, builds the model with
  its parameters on the meta device (no memory, no init), checks every key and shape of the
  checkpoint before anything is assigned (`load_state_dict(assign=True)`), so a mismatching
  checkpoint fails as a whole, and returns the model in `dtype` (None: torch's default float dtype)
  in eval mode.
* `save_pretrained(path)` writes the published layout: config.json (`_class_name` + config) and the
  weights under the family's file name, each tied tensor once.

A family declares its layout and what later commands read as class attributes:

    weights_names     files `from_pretrained` looks for in a folder (the first is written)
    repeated_blocks   ModuleList attributes (dotted paths) holding the repeated blocks (prune)
    keep_precision    fnmatch patterns of module names kept in higher precision (quantize)
    example_inputs()  small keyword inputs of `forward` with the right shapes (export)

and overrides the hooks where its files differ from an HF-style folder: `read_checkpoint` (TAEHV
and QuickSRNet files with the config read from tensor shapes), `config_from_published` (load-time
flags, transformers configs), `published_config` / `published_module` (what is written).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.models.checkpoint import (
    check_state_dict,
    find_file,
    read_config,
    read_state_dict,
    save_folder,
    tied_aliases,
    untied_state_dict,
    with_tied_keys,
)


@dataclass
class Checkpoint:
    """What `read_checkpoint` found: the published config (config.json, or one inferred from the
    tensors), the flat state dict of the published module, and the path to name in messages."""

    config: dict
    state: dict[str, torch.Tensor]
    source: str


def jsonable(value: Any) -> Any:
    """A constructor argument as it is stored in config.json."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):  # a transformers config
        return value.to_dict()
    return value


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "float16", ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise UsageError(f"unknown dtype '{dtype}'", hint="use e.g. float32, bfloat16, float16")
    return resolved


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters and persistent buffers on the meta device (the
    initialisers then run on meta too); non-persistent buffers, constants derived from the config
    that no checkpoint holds, stay real. A parameter registered twice (tied) stays one parameter.
    Patches `nn.Module` for the duration: build one model at a time."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def meta_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            if not hasattr(param, "_meta_twin"):  # kept on the real tensor: a tied parameter finds it again
                param._meta_twin = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            param = param._meta_twin
        register_parameter(module, name, param)

    def meta_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, tensor.to("meta") if tensor is not None and persistent else tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = meta_parameter, meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def _records_config(init):
    """Wrap a family's `__init__` so that the outermost call stores its bound arguments as `config`."""
    signature = inspect.signature(init)
    variadic = [p.name for p in signature.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic:
        raise TypeError(f"{init.__qualname__}: a model's constructor is its config; *{variadic[0]} cannot be recorded")

    @functools.wraps(init)
    def init_recording_config(self, *args, **kwargs):
        if "config" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = list(bound.arguments.items())[1:]  # without self
            self.__dict__["config"] = {name: jsonable(value) for name, value in arguments}
        init(self, *args, **kwargs)

    return init_recording_config


class PretrainedModel(nn.Module):
    """Base of every model family (see the module docstring)."""

    config: dict
    weights_names: ClassVar[tuple[str, ...]] = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    published_class_name: ClassVar[str | None] = None  # `_class_name` in config.json; None: the class name
    repeated_blocks: ClassVar[tuple[str, ...]]
    keep_precision: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _records_config(cls.__init__)

    # ------------------------------------------------------------------ capabilities

    def block_lists(self) -> dict[str, nn.ModuleList]:
        """{dotted path: ModuleList} of the repeated blocks named by `repeated_blocks`."""
        return {name: self.get_submodule(name) for name in self.repeated_blocks}

    def modules_kept_in_precision(self) -> list[str]:
        """Names of the submodules matched by `keep_precision` ("" is the whole model)."""
        return [
            name for name, _ in self.named_modules() if any(fnmatch.fnmatchcase(name, p) for p in self.keep_precision)
        ]

    def example_inputs(self, batch: int = 1) -> dict[str, Any]:
        """Small keyword arguments of `forward` with the right shapes for this config, on the model's
        device and in its float dtype (meta tensors for a meta model)."""
        raise NotImplementedError(f"{type(self).__name__} declares no example inputs")

    def _example_factory(self) -> dict:
        """device / dtype of the model's first float parameter, for `example_inputs`."""
        param = next(p for p in self.parameters() if p.is_floating_point())
        return {"device": param.device, "dtype": param.dtype}

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def config_fields(cls) -> list[str]:
        """The constructor arguments, i.e. the config keys and the overrides `from_pretrained` takes."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def read_checkpoint(cls, path: Path) -> Checkpoint:
        """An HF-style folder: config.json and the first of `weights_names` present."""
        config = read_config(path)
        return Checkpoint(config, read_state_dict(find_file(path, cls.weights_names)), str(path))

    @classmethod
    def config_from_published(cls, config: dict) -> dict:
        """Constructor arguments from a published config (metadata such as `_class_name` dropped)."""
        fields = set(cls.config_fields())
        return {k: v for k, v in config.items() if k in fields}

    def published_config(self) -> dict:
        return {"_class_name": self.published_class_name or type(self).__name__, **self.config}

    def published_module(self) -> nn.Module:
        """The module whose state dict is the published weight file."""
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None, **overrides):
        """Load a published checkpoint; `overrides` replace config entries (unknown names: UsageError)."""
        dtype = resolve_dtype(dtype)
        fields = cls.config_fields()
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise UsageError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}", hint=f"known: {', '.join(fields)}")
        checkpoint = cls.read_checkpoint(Path(path))
        arguments = {**cls.config_from_published(checkpoint.config), **overrides}
        try:
            with parameters_on_meta():
                model = cls(**arguments)
        except (UsageError, TypeError, ValueError) as exc:
            message = exc.message if isinstance(exc, UsageError) else str(exc)
            raise CheckpointError(f"{checkpoint.source}: not a valid {cls.__name__} config: {message}") from None
        model._assign(checkpoint.state, checkpoint.source)
        return model.to(dtype or torch.get_default_dtype()).eval()

    def _assign(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Check every key and shape, then assign the tensors (in their stored dtype) and re-tie."""
        target = self.published_module()
        aliases = tied_aliases(target)
        state = with_tied_keys(state, aliases)
        check_state_dict(target, state, source=source)
        target.load_state_dict(state, strict=True, assign=True)
        for duplicate, first in aliases.items():  # assign gave each name its own Parameter
            owner, _, leaf = duplicate.rpartition(".")
            setattr(target.get_submodule(owner), leaf, target.get_parameter(first))

    def save_pretrained(self, path: str | Path) -> None:
        save_folder(path, self.published_config(), untied_state_dict(self.published_module()), self.weights_names[0])
