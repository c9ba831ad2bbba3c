"""`neodragon` under torchrun, for the tests that compare 2 gloo ranks with one process (marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.artifacts import verify_artifact

MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo"),
]
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_neodragon(args: list[str], *, ranks: int = 2, timeout: float = 600) -> str:
    """`neodragon ARGS` as fresh processes (`ranks` of them under torchrun, one thread each); asserts it
    exits 0 and returns its stdout + stderr."""
    launcher = TWO_RANKS if ranks == 2 else [sys.executable]
    assert ranks in (1, 2)
    proc = subprocess.run([*launcher, "-m", "neodragon_cli", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def assert_two_ranks_match_accumulation(args: list[str], tmp_path: Path,
                                        weights: Callable[[Path], dict[str, torch.Tensor]],
                                        two_ranks_only: tuple[str, ...] = ()) -> None:
    """A training command on 2 ranks (with `two_ranks_only` added, e.g. `train.fsdp=true`) ends with the
    weights of one process accumulating 2 micro-batches: equal up to rounding in the all-reduce (atol
    1e-4, rtol 1e-3; Adam moves weights by ~1e-2 a step, so another batch or another start would show),
    and its artifact verifies."""
    one, two = tmp_path / "one", tmp_path / "two"
    result = CliRunner().invoke(app, [*args, "train.grad_accum=2", "-o", str(one)])
    assert result.exit_code == 0, result.output
    run_neodragon([*args, *two_ranks_only, "-o", str(two)])
    assert verify_artifact(two) == []
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3, msg=key)
