"""Artifact folders: what every command writes, and the provenance chain that ties them together.

    OUT/
      state.json       the chain of operations that produced this artifact, and a sha256 per file
      recipe.yaml      the resolved recipe of the command that wrote it
      metrics.jsonl    one JSON object per line
      <component>/     weights as safetensors + HF-style config.json (written by the component)

`state.json` (format `neodragon-artifact/2`):

    {"format": "neodragon-artifact/2",
     "operations": [            # oldest first; the parent's chain, then this artifact's operation
        {"operation": "prune", "command": "prune", "created": ..., "neodragon_version": ...,
         "recipe_sha256": ..., "parent": {"path": ..., "hash": ...} | null,
         "results": {...}, "output": DIGEST}],
     "files": {"mmdit/config.json": SHA256, ...}}   # every file but state.json

`output` is the digest of the `files` map the operation wrote, and an operation's `parent.hash` is
its parent's `output`: the chain links each artifact to the exact bytes it was made from.
`verify_artifact` re-hashes the files and walks the links. `OPERATIONS` says which operation may
follow which (a model that was exported cannot be pruned; quantize needs an export).

The folder is assembled under a temporary sibling name and renamed onto OUT only when the command
succeeds, so nothing half-written is left behind. An existing non-empty OUT is refused unless
`overwrite=True`, in which case it is replaced only after the new one is complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neodragon_cli.atomic import write_json, write_text
from neodragon_cli.errors import ArtifactError, UsageError
from neodragon_cli.paths import check_creatable

FORMAT = "neodragon-artifact/2"
_LEGACY_FORMAT = "neodragon-artifact/1"
STATE_FILE = "state.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Operation:
    """An operation that writes an artifact. `not_after`: operations that, once in the chain, make
    this one meaningless or impossible (it would undo or ignore them); `needs`: operations that must
    already be in the chain."""

    name: str
    description: str
    not_after: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()


_GRAPH_FORMS = frozenset({"export", "quantize"})  # after these the model is a static graph, not weights
OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("train-vae", "train a causal video VAE", _GRAPH_FORMS),
        Operation("train-t2v", "train text encoders and MMDiT on a VAE's latents", _GRAPH_FORMS),
        Operation("convert", "store the weights in another dtype", _GRAPH_FORMS),
        Operation("distill-te", "replace the text path by a distilled encoder + ContextAdapter", _GRAPH_FORMS),
        Operation("distill-decoder", "replace the decoder by a distilled light decoder", _GRAPH_FORMS),
        # pruning after step distillation would throw away the distilled schedule's calibration
        Operation("prune", "remove MMDiT blocks and recover", _GRAPH_FORMS | {"step-distill"}),
        Operation("step-distill", "distil the MMDiT to a few-step schedule", _GRAPH_FORMS),
        Operation("export", "static per-stage graphs", _GRAPH_FORMS),
        Operation("quantize", "post-training quantization of exported graphs", frozenset({"quantize"}), frozenset({"export"})),
    )
}


def check_operation(name: str, history: list[str], *, needs: tuple[str, ...] = ()) -> None:
    """Raise UsageError unless operation `name` may follow the operations `history` (oldest first).
    `needs` adds requirements a recipe states (e.g. export of a step-distilled MMDiT only)."""
    if name not in OPERATIONS:
        raise UsageError(f"unknown operation '{name}'", hint=f"known: {', '.join(OPERATIONS)}")
    op = OPERATIONS[name]
    done = set(history)
    blocking = [h for h in history if h in op.not_after]
    if blocking:
        raise UsageError(
            f"{name} cannot follow {blocking[0]}",
            hint=f"run {name} on the artifact before {blocking[0]} (its chain: {' > '.join(history)})",
        )
    missing = sorted((op.needs | set(needs)) - done)
    if missing:
        raise UsageError(
            f"{name} needs a parent that went through {', '.join(missing)}",
            hint=f"its chain is {' > '.join(history) or 'empty'}; run {missing[0]} first",
        )


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file below `folder` but state.json (relative posix path → hash)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != STATE_FILE
    }


def files_digest(files: dict[str, str]) -> str:
    """One digest of a `files` map (what an operation's `output` and a child's `parent.hash` hold)."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}:{files[rel]}\n".encode())
    return digest.hexdigest()


def folder_hash(folder: str | Path) -> str:
    """One hash for a folder's content (stable across copies)."""
    return files_digest(content_hashes(folder))


# ----------------------------------------------------------------------------- state


def _from_legacy(state: dict) -> dict:
    """A format-1 state (a flat `optimisations` list) as format 2, without outputs it never recorded."""
    operations = []
    for i, entry in enumerate(state.get("optimisations", [])):
        entry = dict(entry)
        last = i == len(state["optimisations"]) - 1
        operations.append({
            "operation": entry.pop("optimisation"), "command": entry.pop("command", None),
            "parent": state.get("parent") if last else None, "results": entry, "output": None,
        })
    return {"format": _LEGACY_FORMAT, "operations": operations, "files": state.get("files", {})}


def read_state(folder: str | Path) -> dict:
    """The folder's state (format 2; a format-1 file is translated). A folder without state.json
    (a published checkpoint) has an empty chain."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return {"format": None, "operations": [], "files": {}}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", hint="the artifact is damaged; rebuild it") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} does not hold a state object")
    if state.get("format") == _LEGACY_FORMAT:
        return _from_legacy(state)
    return state


def applied_operations(folder: str | Path) -> list[str]:
    """Names of the operations in the folder's chain, oldest first."""
    return [op["operation"] for op in read_state(folder).get("operations", [])]


def verify_artifact(folder: str | Path) -> list[str]:
    """Every problem with `folder`'s recorded files and chain, the first mismatch first (empty: it
    verifies). Checks: format, each recorded file present with its sha256, no unrecorded file, the
    last operation's output equal to the files' digest, and each operation's parent hash equal to
    the previous operation's output."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        return [f"{folder} has no {STATE_FILE}: it is not an artifact written by neodragon"]
    try:
        state = read_state(folder)
    except ArtifactError as exc:
        return [exc.message]
    if state.get("format") != FORMAT:
        return [f"{folder / STATE_FILE}: format {state.get('format')!r} records no verifiable chain (expected {FORMAT})"]
    problems = []
    recorded: dict[str, str] = state.get("files", {})
    present = content_hashes(folder)
    for rel, expected in recorded.items():
        if rel not in present:
            problems.append(f"{folder / rel}: missing (recorded in {STATE_FILE})")
        elif present[rel] != expected:
            problems.append(f"{folder / rel}: sha256 {present[rel][:12]}… does not match the recorded {expected[:12]}…")
    problems += [f"{folder / rel}: not recorded in {STATE_FILE}" for rel in present if rel not in recorded]
    operations = state.get("operations", [])
    if not operations:
        return problems + [f"{folder / STATE_FILE}: records no operation"]
    if operations[-1].get("output") != files_digest(recorded):
        problems.append(f"{folder / STATE_FILE}: the files map does not match the last operation's output")
    for i in range(1, len(operations)):
        previous, parent = operations[i - 1].get("output"), (operations[i].get("parent") or {}).get("hash")
        if previous is not None and parent != previous:
            problems.append(
                f"{folder / STATE_FILE}: operation {i + 1} ({operations[i]['operation']}) names parent {str(parent)[:12]}…,"
                f" but operation {i} ({operations[i - 1]['operation']}) wrote {previous[:12]}…"
            )
    return problems


# ----------------------------------------------------------------------------- output folders


def embedded_models_root() -> Path:
    return Path(__file__).parent / "weights"


def resolve_model(model: str | Path) -> Path:
    """A local folder, or the name of a model shipped in the package (`neodragon_cli/weights/NAME`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if re.fullmatch(r"[A-Za-z0-9_.-]+", text) is not None and not path.suffix:
        embedded = embedded_models_root() / text
        if embedded.is_dir():
            return embedded
        root = embedded_models_root()
        shipped = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise UsageError(
            f"no model folder '{text}' and no embedded model of that name",
            hint=f"embedded models: {', '.join(shipped) or 'none shipped yet'}; give a local folder",
        )
    raise UsageError(f"model path does not exist: {text}", hint="give a local pipeline folder or an embedded model's name")


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty `out` unless `overwrite`, and an `out` that cannot be created (checked
    before any work starts)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} exists and is not a folder", hint="choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"output folder {out} is not empty", hint="pass --overwrite or choose another -o path")
    return check_creatable(out)


class ArtifactWriter:
    """Context manager assembling an artifact folder atomically, recording one operation.

        with ArtifactWriter(out, command="prune", recipe_yaml=text, parent=parent_dir) as art:
            model.save_pretrained(art.path / "transformer")
            art.log_metrics({"step": 1, "loss": 0.3})
            art.record("prune", kept_blocks=[...])

    The operation (default: `command`) is checked against the parent's chain when the writer is
    made, before any work; a parent with a chain must verify. `record` sets the operation's
    results (several calls merge)."""

    def __init__(self, out: str | Path, *, command: str, recipe_yaml: str | None = None,
                 parent: str | Path | None = None, overwrite: bool = False, operation: str | None = None):
        self.out = check_output_dir(out, overwrite)
        self.command = command
        self.operation = operation or command
        self.recipe_yaml = recipe_yaml
        self.parent = Path(parent) if parent is not None else None
        self.overwrite = overwrite
        self.results: dict[str, Any] = {}
        self.path: Path | None = None
        self._parent_state = read_state(self.parent) if self.parent is not None else {"operations": []}
        if self.parent is not None and self._parent_state.get("format") == FORMAT:
            problems = verify_artifact(self.parent)
            if problems:
                raise ArtifactError(f"parent artifact does not verify: {problems[0]}",
                                    hint=f"run `neodragon verify {self.parent}`; rebuild or restore it")
        check_operation(self.operation, [op["operation"] for op in self._parent_state["operations"]])

    def __enter__(self) -> "ArtifactWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        if self.recipe_yaml is not None:
            write_text(self.path / RECIPE_FILE, self.recipe_yaml)
        return self

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def record(self, operation: str, **results: Any) -> None:
        """Note the results of this artifact's operation (they end up in state.json)."""
        if operation != self.operation:
            raise ValueError(f"this writer records '{self.operation}', not '{operation}'")
        self.results.update(results)

    def copy_pipeline(self, parent: str | Path, *, replace: str | None = None) -> dict[str, Any]:
        """Start this artifact as a copy of pipeline folder `parent` (its own state, recipe and
        metrics excepted), leaving out the folder of role `replace`; returns the parent's
        pipeline.json spec. Save the new component, then call `set_role`."""
        from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE

        parent = Path(parent)
        spec = json.loads((parent / PIPELINE_FILE).read_text())
        skipped = {STATE_FILE, RECIPE_FILE, METRICS_FILE}
        replaced = spec["components"].get(replace, {}).get("path") if replace else None
        for src in sorted(parent.rglob("*")):
            rel = src.relative_to(parent)
            if not src.is_file() or rel.as_posix() in skipped:
                continue
            if replaced is not None and (rel.parts[: len(Path(replaced).parts)] == Path(replaced).parts):
                continue
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, self.path / rel)
        return spec

    def set_role(self, role: str, component: str, folder: str, *, sampling: dict[str, Any] | None = None) -> None:
        """Point pipeline.json's `role` at registered `component` saved in `folder` (relative to
        the artifact), optionally updating sampling defaults (a step-distilled schedule)."""
        from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE, ROLES

        if role not in ROLES:
            raise ValueError(f"unknown pipeline role '{role}' (roles: {', '.join(ROLES)})")
        if not (self.path / folder).exists():
            raise ValueError(f"save the {role} into {folder} before naming it in {PIPELINE_FILE}")
        spec = json.loads((self.path / PIPELINE_FILE).read_text())
        spec["components"][role] = {"component": component, "path": folder}
        if sampling:
            spec["sampling"] = {**spec.get("sampling", {}), **sampling}
        write_json(self.path / PIPELINE_FILE, spec)

    def _operation_entry(self, files: dict[str, str]) -> dict[str, Any]:
        parent = None
        if self.parent is not None:
            parent = {"path": str(self.parent), "hash": folder_hash(self.parent)}
        return {
            "operation": self.operation,
            "command": self.command,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "neodragon_version": _version(),
            "recipe_sha256": None if self.recipe_yaml is None else hashlib.sha256(self.recipe_yaml.encode()).hexdigest(),
            "parent": parent,
            "results": self.results,
            "output": files_digest(files),
        }

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        files = content_hashes(self.path)
        state = {
            "format": FORMAT,
            "operations": list(self._parent_state["operations"]) + [self._operation_entry(files)],
            "files": files,
        }
        write_json(self.path / STATE_FILE, state)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old")
            self.out.rename(old)
            self.path.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(self.out)
        self.path = self.out
        return False


def _version() -> str:
    from neodragon_cli import __version__

    return __version__
