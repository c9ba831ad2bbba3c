"""Prompt corpora for text-encoder distillation: files and the Shapes caption generator, mixed by weight.

A file holds one prompt per line (`.txt`) or a table with a text column (`.jsonl`, `.csv`, `.parquet`;
the column is named, default `text`). Blank prompts are dropped; duplicates are kept once, in order.
Reading `.parquet` needs pyarrow, which is not a dependency of the tool: install it to use such files.

`PromptMixture` draws training prompts from several sources in proportion to their weights, each
draw a pure function of (seed, stream position), so a resumed or distributed run sees the same prompts.
"""

from __future__ import annotations

import csv
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.train.trainer import derive_seed

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


def _unique(prompts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))


def _column(rows: list[dict], column: str, path: Path) -> list[str]:
    if rows and column not in rows[0]:
        raise UsageError(f"{path} has no '{column}' column", hint=f"columns: {', '.join(map(str, rows[0]))}; set data.column")
    return [str(row.get(column) or "") for row in rows]


def _parquet_column(path: Path, column: str) -> list[str]:
    try:  # an optional dependency, imported by name so that the tool does not require it
        parquet = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise UsageError(f"reading {path.name} needs pyarrow", hint="pip install pyarrow, or convert it to .jsonl/.csv") from None
    table = parquet.read_table(path)
    if column not in table.column_names:
        raise UsageError(f"{path} has no '{column}' column", hint=f"columns: {', '.join(table.column_names)}; set data.column")
    return [str(v or "") for v in table.column(column).to_pylist()]


def read_prompts(path: str | Path, column: str = "text") -> list[str]:
    """The unique non-blank prompts of a corpus file (UsageError when it cannot be read or holds none)."""
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise UsageError(f"unknown prompt file type '{path.suffix}' ({path})", hint=f"use {', '.join(PROMPT_SUFFIXES)}")
    try:
        if path.suffix == ".parquet":
            prompts = _parquet_column(path, column)
        else:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".txt":
                prompts = text.splitlines()
            elif path.suffix == ".jsonl":
                prompts = _column([json.loads(line) for line in text.splitlines() if line.strip()], column, path)
            else:
                prompts = _column(list(csv.DictReader(text.splitlines())), column, path)
    except UsageError:
        raise
    except Exception as exc:  # OSError, decoding and parsing errors, pyarrow's own types for a damaged file
        raise UsageError(f"cannot read prompt corpus {path}: {exc}", hint="check the file") from None
    prompts = _unique(prompts)
    if not prompts:
        raise UsageError(f"prompt corpus {path} holds no prompt", hint="give a file with one prompt per line or row")
    return prompts


@dataclass(frozen=True)
class PromptSource:
    name: str
    prompts: list[str]
    weight: float


class PromptMixture:
    """Training prompts from weighted sources: stream position p picks a source with probability
    proportional to its weight, then one of its prompts uniformly, both seeded by (seed, p)."""

    def __init__(self, sources: Sequence[PromptSource], seed: int = 0):
        sources = [s for s in sources if s.prompts]
        if not sources:
            raise UsageError("no training prompts", hint="give data.files or data.shapes_prompts")
        self.sources, self.seed = list(sources), seed
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.prompts = _unique([p for s in sources for p in s.prompts])  # every prompt once, in source order
        self._index = {p: i for i, p in enumerate(self.prompts)}

    def __len__(self) -> int:
        return len(self.prompts)

    def position(self, position: int) -> int:
        """Index into `prompts` of the prompt at stream position `position`."""
        rng = np.random.default_rng(derive_seed(self.seed, position))
        source = self.sources[min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(self.sources) - 1)]
        return self._index[source.prompts[int(rng.integers(len(source.prompts)))]]
