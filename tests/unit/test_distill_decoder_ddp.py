"""`neodragon distill-decoder` under `torchrun --nproc_per_node 2` (gloo, CPU) ends with the weights of
one process that sees the same global batches in two accumulation steps; rank 0 alone writes the
latent cache and the artifact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from neodragon_cli.app import app
from neodragon_cli.artifacts import verify_artifact
from test_distill_decoder import TINY, tensors

NEODRAGON = shutil.which("neodragon", path=str(Path(sys.executable).parent)) or shutil.which("neodragon")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo"),
    pytest.mark.skipif(NEODRAGON is None, reason="the neodragon entry point is not installed"),
]

# Adam's eps well above rounding noise: Adam moves a weight whose gradient is only noise by a whole lr.
RUN = ["train.max_steps=3", "train.eps=1e-3", "train.seed=3"]


def test_two_ranks_match_one_process_with_accumulation(tmp_path):
    args = ["distill-decoder", "shapes/distill_decoder", *TINY, *RUN]
    one, two = tmp_path / "one", tmp_path / "two"
    result = CliRunner().invoke(app, [*args, "train.grad_accum=2", "-o", str(one)])
    assert result.exit_code == 0, result.output
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", NEODRAGON,
               *args, "-o", str(two)]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert verify_artifact(two) == []
    a, b = (tensors(p / "vae" / "diffusion_pytorch_model.safetensors") for p in (one, two))
    assert a.keys() == b.keys()
    for key in a:  # rounding in the all-reduce, not other batches or another start
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3, msg=key)
