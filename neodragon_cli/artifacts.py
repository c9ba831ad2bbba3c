"""Artifact folders: what every command writes.

    OUT/
      state.json       which optimisations produced this artifact, from which parent (content hashes)
      recipe.yaml      the resolved recipe of the command that wrote it
      metrics.jsonl    one JSON object per line
      <component>/     weights as safetensors + HF-style config.json (written by the component)

The folder is assembled under a temporary sibling name and renamed onto OUT only when the command
succeeds, so nothing half-written is left behind. An existing non-empty OUT is refused unless
`overwrite=True`, in which case it is replaced only after the new one is complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from neodragon_cli.atomic import write_json, write_text
from neodragon_cli.errors import ArtifactError

STATE_FILE = "state.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
_HASHED_SUFFIXES = {".safetensors", ".json", ".pth", ".tar", ".model", ".onnx", ".bin", ".yaml"}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight/config file below `folder` (relative posix path → hash)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in _HASHED_SUFFIXES and p.name not in (STATE_FILE, METRICS_FILE)
    }


def folder_hash(folder: str | Path) -> str:
    """One hash for a folder's content (stable across copies)."""
    digest = hashlib.sha256()
    for rel, h in content_hashes(folder).items():
        digest.update(f"{rel}:{h}\n".encode())
    return digest.hexdigest()


def read_state(folder: str | Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return {"optimisations": []}
    return json.loads(path.read_text())


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty `out` unless `overwrite` (checked before any work starts)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} exists and is not a folder", hint="choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"output folder {out} is not empty", hint="pass --overwrite or choose another -o path")
    return out


class ArtifactWriter:
    """Context manager assembling an artifact folder atomically.

        with ArtifactWriter(out, command="prune", recipe_yaml=text, parent=parent_dir) as art:
            model.save_pretrained(art.path / "transformer")
            art.log_metrics({"step": 1, "loss": 0.3})
            art.record("prune", kept_blocks=[...])
    """

    def __init__(self, out: str | Path, *, command: str, recipe_yaml: str | None = None,
                 parent: str | Path | None = None, overwrite: bool = False):
        self.out = check_output_dir(out, overwrite)
        self.command = command
        self.recipe_yaml = recipe_yaml
        self.parent = Path(parent) if parent is not None else None
        self.overwrite = overwrite
        self.applied: list[dict[str, Any]] = []
        self.path: Path | None = None

    def __enter__(self) -> "ArtifactWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        if self.recipe_yaml is not None:
            write_text(self.path / RECIPE_FILE, self.recipe_yaml)
        return self

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def record(self, optimisation: str, **details: Any) -> None:
        """Note an optimisation this command applied (ends up in state.json)."""
        self.applied.append({"optimisation": optimisation, "command": self.command, **details})

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        parent_state = read_state(self.parent) if self.parent else {"optimisations": []}
        state = {
            "format": "neodragon-artifact/1",
            "command": self.command,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "neodragon_version": _version(),
            "parent": None if self.parent is None else {"path": str(self.parent), "hash": folder_hash(self.parent)},
            "optimisations": parent_state.get("optimisations", []) + self.applied,
            "files": content_hashes(self.path),
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


def applied_optimisations(folder: str | Path) -> list[str]:
    return [o["optimisation"] for o in read_state(folder).get("optimisations", [])]


def _version() -> str:
    from neodragon_cli import __version__

    return __version__
