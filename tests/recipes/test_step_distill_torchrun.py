"""`neodragon step-distill` under `torchrun --nproc_per_node 2` (gloo, CPU) ends with the weights of one
process that sees the same global batches in two accumulation steps: DMD (fake score and student phases,
prompts only; with DDP and with FSDP) and progressive (rank 0 alone generates the teacher videos, the other rank reads them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_prune import tiny_pipeline
from test_step_distill_cli import TINY, weights
from torchrun_cli import MARKS, assert_two_ranks_match_accumulation

pytestmark = MARKS

# batch 4: 2 samples per rank. Adam's eps well above rounding noise (see test_prune_ddp).
RUN = ["train.batch_size=4", "train.max_steps=2", "train.eps=1e-3", "critic.eps=1e-3", "train.seed=3", "schedule=2-2-2"]


@pytest.mark.parametrize("method, two_ranks_only", [("dmd", ()), ("progressive", ()), ("dmd", ("train.fsdp=true",))],
                         ids=["dmd", "progressive", "dmd-fsdp"])
def test_two_ranks_match_one_process_with_accumulation(tmp_path, method, two_ranks_only):
    """FSDP shards the student and the fake score model one unit per block; the tiny MMDiT's 0-wide
    pooled input gives it zero-element parameters, which FSDP must leave out."""
    parent = tiny_pipeline(tmp_path)
    args = ["step-distill", f"shapes/step_distill_{method}", f"parent={parent}", *TINY, *RUN]
    assert_two_ranks_match_accumulation(args, tmp_path, weights, two_ranks_only)
