"""Output paths, checked before any work: a command refuses (exit 2) a path it could not write at the end.

Every command that writes (videos, reports, artifact folders) calls these on its output options
before it loads a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from neodragon_cli.errors import ArtifactError


def check_creatable(path: str | Path) -> Path:
    """Refuse an output `path` that cannot be created: the nearest existing folder above it is a file,
    or is not writable (so its missing folders, or the file itself, could not be made)."""
    path = Path(path)
    for ancestor in path.absolute().parents:
        if not ancestor.exists():
            continue
        if not ancestor.is_dir():
            raise ArtifactError(f"cannot write {path}: {ancestor} is a file, not a folder", hint="choose another output path")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ArtifactError(f"cannot write {path}: folder {ancestor} is not writable", hint="choose another output path")
        break
    return path


def check_output_file(path: str | Path) -> Path:
    """`check_creatable`, and refuse a `path` that is an existing folder (a report or text file output)."""
    path = check_creatable(path)
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a folder", hint="give a file path")
    return path


def check_new_output(path: str | Path, overwrite: bool) -> Path:
    """`check_creatable`, and refuse an existing `path` unless `overwrite`."""
    path = check_creatable(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} already exists", hint="pass --overwrite to replace it, or choose another output path")
    return path
