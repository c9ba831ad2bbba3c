"""Component registry: every model of the pipeline is registered by kind and name.

    @register("decoder", "taehv", description="...", detect=looks_like_taehv)
    class TAEHV(nn.Module): ...

Recipes name components as `kind/name` (e.g. `mmdit/pyramid-flow`). A registered class provides
`from_pretrained(path, **kw)` (and usually `save_pretrained(path)`); `detect(path) -> bool` lets
`load_component(kind, path)` and `components inspect` recognise a checkpoint folder or file.
Modules under `neodragon_cli.pipelines.models` (and the safety checker of `pipelines.eval.safety`)
register themselves on import; `_ensure_loaded` imports them all the first time the registry is queried.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from neodragon_cli.errors import CheckpointError, UnknownNameError


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Any  # class (or callable) with .from_pretrained
    description: str = ""
    detect: Callable[[Path], bool] | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    def load(self, path: str | Path, **kwargs):
        return self.factory.from_pretrained(path, **kwargs)


_REGISTRY: dict[str, dict[str, Component]] = {}
_LOADED = False


def register(kind: str, name: str, *, description: str = "", detect: Callable[[Path], bool] | None = None):
    """Class decorator registering `cls` as component `kind/name`."""

    def wrap(cls):
        existing = _REGISTRY.setdefault(kind, {}).get(name)
        if existing is not None and existing.factory is not cls:
            raise RuntimeError(f"component {kind}/{name} registered twice ({existing.factory} and {cls})")
        doc = description or (cls.__doc__ or "").strip().splitlines()[0] if (description or cls.__doc__) else ""
        _REGISTRY[kind][name] = Component(kind, name, cls, doc, detect)
        return cls

    return wrap


def import_submodules(package_name: str) -> list:
    """Import every public module of a package (in name order); modules register things on import."""
    package = importlib.import_module(package_name)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_"))
    return [importlib.import_module(f"{package_name}.{name}") for name in names]


def _ensure_loaded() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import_submodules("neodragon_cli.pipelines.models")
    importlib.import_module("neodragon_cli.pipelines.eval.safety")  # the safety checker component


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def kinds() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def components(kind: str | None = None) -> list[Component]:
    _ensure_loaded()
    if kind is not None and kind not in _REGISTRY:
        raise UnknownNameError(
            f"unknown component kind '{kind}'",
            hint=f"{did_you_mean(kind, kinds())}known kinds: {', '.join(kinds())}",
        )
    selected = [_REGISTRY[kind]] if kind else [_REGISTRY[k] for k in sorted(_REGISTRY)]
    return [c for group in selected for c in sorted(group.values(), key=lambda c: c.name)]


def get(key: str) -> Component:
    """Look up `kind/name`; unknown names fail with the known ones and a did-you-mean."""
    _ensure_loaded()
    kind, _, name = key.partition("/")
    if not name:
        raise UnknownNameError(f"component name '{key}' must be of the form kind/name", hint="see `neodragon components list`")
    group = {c.name: c for c in components(kind)}
    if name not in group:
        raise UnknownNameError(
            f"unknown component '{key}'",
            hint=f"{did_you_mean(name, sorted(group))}known {kind} components: {', '.join(sorted(group))}",
        )
    return group[name]


def detect(path: str | Path, kind: str | None = None) -> list[Component]:
    """Registered components whose `detect` recognises `path` (optionally of one kind)."""
    path = Path(path)
    return [c for c in components(kind) if c.detect is not None and c.detect(path)]


def load_component(kind: str, path: str | Path, **kwargs):
    """Load a ready-to-use module of `kind` (e.g. "mmdit") or `kind/name` from a local folder or file.

    With a bare kind the checkpoint layout picks the component (see `neodragon components list`).
    The returned module is in eval mode; loading fails as a whole (no partially loaded model).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}", hint="give a local folder or file")
    if "/" in kind:
        component = get(kind)
    else:
        found = detect(path, kind)
        if not found:
            names = ", ".join(c.name for c in components(kind))
            raise CheckpointError(
                f"{path} is not a recognised {kind} checkpoint",
                hint=f"known {kind} layouts: {names}; or name one explicitly as {kind}/NAME",
            )
        component = found[0]
    module = component.load(path, **kwargs)
    return module.eval() if hasattr(module, "eval") else module
