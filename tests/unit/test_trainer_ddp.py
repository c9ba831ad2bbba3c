"""The trainer under `torchrun --nproc_per_node 2` (gloo, CPU): DDP and FSDP2 reach the weights of
one process that sees the same global batches; only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trainer_toy import make_trainer

TOY_SCRIPT = Path(__file__).with_name("trainer_toy.py")

# Dropout and loss noise on: their seeds follow sample positions, so 2 ranks x 4 samples draw what
# 1 process x 2 accumulation steps x 4 samples draws.
NOISY = dict(seed=1, max_steps=6, batch_size=8, lr=2e-2, schedule="cosine", warmup_steps=1, grad_clip=0.5,
             ema=0.8, checkpoint_every=4, log_every=1)
# Deterministic loss: 2 ranks x 4 samples must match 1 process x 8 samples.
PLAIN = dict(max_steps=6, batch_size=8, lr=2e-2, grad_clip=None, log_every=2)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo"),
]


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """One torchrun launch, three trainings: DDP noisy, DDP plain, FSDP noisy."""
    root = tmp_path_factory.mktemp("ddp")
    runs = [
        {"out": str(root / "ddp_noisy"), "config": NOISY},
        {"out": str(root / "ddp_plain"), "config": PLAIN, "toy": {"noise": False, "dropout": 0.0}},
        {"out": str(root / "fsdp_noisy"), "config": {**NOISY, "fsdp": True}},
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TOY_SCRIPT), json.dumps(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def _single(tmp_path, config, **toy):
    torch.set_num_threads(1)
    trainer = make_trainer(tmp_path, config, **toy)
    trainer.fit()
    return trainer


def test_ddp_matches_one_process_with_accumulation(two_rank_runs, tmp_path):
    single = _single(tmp_path, {**NOISY, "grad_accum": 2})
    ddp = _final(two_rank_runs / "ddp_noisy")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6)
    ckpt = torch.load(two_rank_runs / "ddp_noisy" / "checkpoints" / "step-00000006.pt", weights_only=True)
    assert ckpt["world_size"] == 2
    for name, value in single.model_state_dict(ema=True).items():
        torch.testing.assert_close(ckpt["model"][name] if name not in ckpt["ema"] else ckpt["ema"][name], value, rtol=1e-5, atol=1e-6)


def test_ddp_matches_one_process_with_the_combined_batch(two_rank_runs, tmp_path):
    single = _single(tmp_path, PLAIN, noise=False, dropout=0.0)
    ddp = _final(two_rank_runs / "ddp_plain")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6)


def test_only_rank0_writes(two_rank_runs):
    out = two_rank_runs / "ddp_noisy"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000006.pt"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))  # one line per step, not one per rank


def test_fsdp_matches_ddp(two_rank_runs):
    ddp, fsdp = _final(two_rank_runs / "ddp_noisy"), _final(two_rank_runs / "fsdp_noisy")
    assert set(ddp) == set(fsdp)
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-6)
