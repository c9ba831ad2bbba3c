"""YAML recipes: strict, typed by a dataclass schema per command, with `key.sub=value` overrides.

A recipe file looks like

    command: generate            # which schema applies (see `neodragon recipes list`)
    extends: neodragon/hybrid    # optional: a shipped recipe name or a path relative to this file
    description: one line shown by `recipes list`
    sampler:
      steps: [1, 1, 1]

Schemas are (nested) dataclasses registered with `@recipe_schema("command")` in the library modules
named by `SCHEMA_MODULES`; every field has a type and a `metadata={"doc": ...}` (see `setting`).
This module imports neither typer nor the command modules, so library code may use it. Loading walks every node and collects *all* problems (unknown
keys by dotted path with a did-you-mean, wrong types, bad YAML) with file and line, then raises one
`RecipeError`. Only `yaml.safe_load`/`compose` are used.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from neodragon_cli.errors import RecipeError, UnknownNameError
from neodragon_cli.registry import did_you_mean, import_submodules

META_KEYS = ("command", "extends", "description")
_SCHEMAS: dict[str, type] = {}
# Library modules (and packages: every module in them) that register recipe schemas on import. A
# command's schema lives beside the library code that runs it, never in the command-line layer.
SCHEMA_MODULES = (
    "neodragon_cli.pipelines.flow.settings",  # generate
    "neodragon_cli.pipelines.train",  # one module per training command
    "neodragon_cli.pipelines.distill",  # the optimisation commands that train
    "neodragon_cli.pipelines.chain",  # `run`: chains of commands
)


def setting(default: Any, doc: str):
    """A schema field with its default and documentation (shown by `recipes show --schema`).
    Mutable defaults (lists, dicts) are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def recipe_schema(command: str):
    """Register a dataclass as the recipe schema of `command`."""

    def wrap(cls):
        if not is_dataclass(cls):
            raise TypeError(f"recipe schema for {command} must be a dataclass")
        _SCHEMAS[command] = cls
        return cls

    return wrap


def schemas() -> dict[str, type]:
    """Every recipe schema by command (importing the modules of `SCHEMA_MODULES` once)."""
    for name in SCHEMA_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):
            import_submodules(name)
    return dict(sorted(_SCHEMAS.items()))


def schema_for(command: str) -> type:
    """The schema of `command` (the schema modules are imported only when it is not registered yet)."""
    if command in _SCHEMAS:
        return _SCHEMAS[command]
    known = schemas()
    if command not in known:
        raise UnknownNameError(
            f"no recipe schema for command '{command}'",
            hint=f"{did_you_mean(command, list(known))}commands with recipes: {', '.join(known)}",
        )
    return known[command]


# ----------------------------------------------------------------------------- shipped recipes


def shipped_root() -> Path:
    return Path(str(resources.files("neodragon_cli.shipped_recipes")))


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe names (`family/name`) → file."""
    root = shipped_root()
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def resolve_path(name_or_path: str | Path, *, relative_to: Path | None = None) -> Path:
    """A path (absolute, relative to `relative_to` or the cwd) or a shipped recipe name."""
    candidate = Path(name_or_path)
    for base in ([relative_to] if relative_to else []) + [Path.cwd()]:
        p = candidate if candidate.is_absolute() else base / candidate
        if p.is_file():
            return p
    shipped = shipped_recipes()
    key = str(name_or_path).removesuffix(".yaml")
    if key in shipped:
        return shipped[key]
    raise UnknownNameError(
        f"recipe '{name_or_path}' is neither a file nor a shipped recipe",
        hint=f"{did_you_mean(key, list(shipped))}see `neodragon recipes list`",
    )


# ----------------------------------------------------------------------------- YAML with lines


class _Doc:
    """A parsed YAML mapping plus the line of every dotted key (for error messages)."""

    def __init__(self, data: dict, lines: dict[str, int], source: str):
        self.data, self.lines, self.source = data, lines, source

    def where(self, dotted: str) -> str:
        line = self.lines.get(dotted)
        return f"{self.source}:{line}" if line else self.source


def _collect_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[dotted] = key_node.start_mark.line + 1
            _collect_lines(value_node, dotted, out)


def _parse_yaml(text: str, source: str) -> _Doc:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{where}: not valid YAML: {problem}"], hint="fix the YAML syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}"])
    lines: dict[str, int] = {}
    if node is not None:
        _collect_lines(node, "", lines)
    return _Doc(data, lines, source)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Data of `path` merged over its `extends` chain, and where each dotted key came from."""
    path = path.resolve()
    if path in seen:
        raise RecipeError([f"{path.name}: recipe inheritance cycle: {' -> '.join(p.name for p in seen + (path,))}"])
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise RecipeError([f"{path.name}: not a text file"], hint="give a YAML recipe") from None
    doc = _parse_yaml(text, path.name)
    origins = {k: doc.where(k) for k in doc.lines}
    data = dict(doc.data)
    parent = data.pop("extends", None)
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise RecipeError([f"{doc.where('extends')}: extends must be a recipe name or path"])
    base_data, base_origins = _read_chain(resolve_path(parent, relative_to=path.parent), seen + (path,))
    if "description" in base_data and "description" not in data:
        base_data.pop("description")
    return _merge(base_data, data), {**base_origins, **origins}


# ----------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, where, problems: list[str]) -> Any:
    """Check/convert `value` against type `tp`; append problems, return the converted value."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _convert(value, arg, path, where, trial)
            if not trial:
                return out
        problems.append(f"{where(path)}: {path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            guess = did_you_mean(str(value), [str(a) for a in get_args(tp)])
            problems.append(f"{where(path)}: {path}: {guess}expected one of {_type_name(tp)}, got {value!r}")
        return value
    if is_dataclass(tp):
        return _build(tp, value, path, where, problems)
    if origin in (list, tuple):
        if not isinstance(value, list):
            problems.append(f"{where(path)}: {path}: expected {_type_name(tp)}, got {value!r}")
            return value
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{path}[{i}]", where, problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where(path)}: {path}: expected {_type_name(tp)}, got {value!r}")
            return value
        value_tp = get_args(tp)[1] if get_args(tp) else Any
        return {k: _convert(v, value_tp, f"{path}.{k}", where, problems) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    problems.append(f"{where(path)}: {path}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str, where, problems: list[str]):
    """Instantiate dataclass `cls` from `data`, collecting problems instead of stopping."""
    label = prefix or "recipe"
    if not isinstance(data, dict):
        problems.append(f"{where(prefix)}: {label}: expected a mapping, got {data!r}")
        return None
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    before = len(problems)
    for key in data:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"{where(dotted)}: unknown key '{dotted}' ({did_you_mean(str(key), list(known))}known: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted, where, problems)
        elif f.default is MISSING and f.default_factory is MISSING:
            if is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, dotted, where, problems)
            else:
                problems.append(f"{where(prefix)}: missing required key '{dotted}' ({_type_name(hints[name])})")
    if any(v is None and is_dataclass(hints[k]) for k, v in kwargs.items()):
        return None
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None  # already reported
    check = getattr(obj, "validate", None)
    if callable(check) and len(problems) == before:  # cross-field checks only on well-typed values
        for problem in check() or []:
            problems.append(f"{where(prefix)}: {label}: {problem}")
    return obj


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value parsed as YAML scalar/list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError([f"override '{text}' is not of the form key.sub=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- public API


def load(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = (), *, command: str | None = None):
    """Load, merge `extends`, apply overrides and validate a recipe; returns the schema instance.

    Raises RecipeError listing every problem (file:line: message)."""
    path = resolve_path(path_or_name)
    data, origins = _read_chain(path)
    problems: list[str] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        apply_override(data, key, value)
        origins[key] = "override"
    declared = data.pop("command", None)
    data.pop("description", None)
    if command is not None and declared not in (None, command):
        problems.append(f"{path.name}: recipe is for command '{declared}', not '{command}'")
    chosen = command or declared
    if chosen is None:
        problems.append(f"{path.name}: recipe has no 'command' key (one of: {', '.join(schemas())})")
        raise RecipeError(problems)
    cls = schema_for(chosen)
    where = lambda dotted: origins.get(dotted) or path.name  # noqa: E731
    obj = _build(cls, data, "", where, problems)
    if problems:
        raise RecipeError(problems, hint="fix the recipe or the override")
    return obj


def build(cls: type, data: Any, *, source: str, prefix: str = ""):
    """Instantiate schema dataclass `cls` from plain `data` with the checks a recipe file gets (unknown
    keys with a did-you-mean, types, `validate`); RecipeError lists every problem as `source: prefix.key: ...`
    (for settings that arrive inside another recipe, e.g. a chain step's options)."""
    problems: list[str] = []
    obj = _build(cls, data, prefix, lambda dotted: source, problems)
    if problems:
        raise RecipeError(problems, hint="fix the recipe or the override")
    return obj


def validate(path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every problem of a recipe (empty list when valid)."""
    try:
        load(path_or_name, overrides)
    except RecipeError as exc:
        return exc.problems
    except UnknownNameError as exc:
        return [exc.one_line()]
    return []


def command_of(obj) -> str:
    """The command whose schema `obj` is an instance of (a registered schema, so no imports needed)."""
    for name, cls in _SCHEMAS.items():
        if type(obj) is cls:
            return name
    raise KeyError(type(obj).__name__)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def dump(obj, *, command: str | None = None) -> str:
    """The resolved recipe as YAML (saved next to every artifact)."""
    data = {"command": command or command_of(obj), **to_dict(obj)}
    return yaml.safe_dump(_plain(data), sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) rows of a schema, for `recipes show --schema`."""
    rows = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if is_dataclass(tp):
            rows.append((dotted, "section", "", f.metadata.get("doc", "")))
            rows.extend(describe(tp, dotted))
            continue
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((dotted, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
