"""The trainer under `torchrun --nproc_per_node 2` (gloo, CPU): DDP and FSDP2 reach the weights of
one process that sees the same global batches, for one model and for a generator and critic trained
in phases (with a critic parameter that gets no gradient in the critic's phase); only rank 0 writes
files; an exception tears the process group down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trainer_toy import make_trainer, make_two_model_trainer

TOY_SCRIPT = Path(__file__).with_name("trainer_toy.py")

# Dropout and loss noise on: their seeds follow sample positions, so 2 ranks x 4 samples draw what
# 1 process x 2 accumulation steps x 4 samples draws.
NOISY = dict(seed=1, max_steps=6, batch_size=8, lr=2e-2, schedule="cosine", warmup_steps=1, grad_clip=0.5,
             ema=0.8, checkpoint_every=4, log_every=1)
# Deterministic loss: 2 ranks x 4 samples must match 1 process x 8 samples.
PLAIN = dict(max_steps=6, batch_size=8, lr=2e-2, grad_clip=None, log_every=2)
# Two models, 2 critic updates per generator update.
TWO_LOOP = dict(seed=2, max_steps=4, batch_size=8, checkpoint_every=3, log_every=1)
TWO_OPTIMIZERS = {"generator": dict(lr=2e-2, schedule="cosine", warmup_steps=1, grad_clip=0.5, ema=0.8),
                  "critic": dict(lr=3e-2, grad_clip=None)}
PLAIN_TOY = {"noise": False, "dropout": 0.0}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo"),
]


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """One torchrun launch, all the trainings: DDP noisy and plain, FSDP noisy, for one model and for
    two; then one that fails."""
    root = tmp_path_factory.mktemp("ddp")
    runs = [
        {"out": str(root / "ddp_noisy"), "config": NOISY},
        {"out": str(root / "ddp_plain"), "config": PLAIN, "toy": PLAIN_TOY},
        {"out": str(root / "fsdp_noisy"), "config": {**NOISY, "fsdp": True}},
        {"out": str(root / "two_ddp_noisy"), "config": TWO_LOOP, "two_models": TWO_OPTIMIZERS},
        {"out": str(root / "two_ddp_plain"), "config": TWO_LOOP, "two_models": TWO_OPTIMIZERS, "toy": PLAIN_TOY},
        {"out": str(root / "two_fsdp_noisy"), "config": {**TWO_LOOP, "fsdp": True}, "two_models": TWO_OPTIMIZERS},
        {"out": str(root / "failing"), "config": PLAIN, "fail_at": 2},  # last: it ends the process group
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
        saved = ckpt["ema"]["model"].get(name, ckpt["models"]["model"][name])
        torch.testing.assert_close(saved, value, rtol=1e-5, atol=1e-6)


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


def _assert_two_models_close(saved: dict, trainer) -> None:
    assert set(saved) == {"generator", "critic"}
    for name, state in saved.items():
        for key, value in trainer.models[name].state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_two_model_ddp_matches_one_process_with_the_combined_batch(two_rank_runs, tmp_path):
    torch.set_num_threads(1)
    single = make_two_model_trainer(tmp_path, TWO_LOOP, TWO_OPTIMIZERS, **PLAIN_TOY)
    start = {k: v.clone() for k, v in single.models["critic"].state_dict().items()}
    single.fit()
    saved = _final(two_rank_runs / "two_ddp_plain")
    _assert_two_models_close(saved, single)
    assert torch.equal(saved["critic"]["aux.weight"], start["aux.weight"])  # no gradient reached it
    assert not torch.equal(saved["critic"]["blocks.0.weight"], start["blocks.0.weight"])


def test_two_model_ddp_matches_one_process_with_accumulation(two_rank_runs, tmp_path):
    torch.set_num_threads(1)
    single = make_two_model_trainer(tmp_path, {**TWO_LOOP, "grad_accum": 2}, TWO_OPTIMIZERS)
    single.fit()
    _assert_two_models_close(_final(two_rank_runs / "two_ddp_noisy"), single)
    ckpt = torch.load(two_rank_runs / "two_ddp_noisy" / "checkpoints" / "step-00000004.pt", weights_only=True)
    for key, value in single.model_state_dict("generator", ema=True).items():
        saved = ckpt["ema"]["generator"].get(key, ckpt["models"]["generator"][key])
        torch.testing.assert_close(saved, value, rtol=1e-5, atol=1e-6)
    lines = [json.loads(line) for line in (two_rank_runs / "two_ddp_noisy" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"critic/loss", "generator/loss", "generator/grad_norm", "lr/critic", "lr/generator"} <= set(lines[-1])


def test_two_model_fsdp_matches_ddp(two_rank_runs):
    ddp, fsdp = _final(two_rank_runs / "two_ddp_noisy"), _final(two_rank_runs / "two_fsdp_noisy")
    for name in ddp:
        assert set(ddp[name]) == set(fsdp[name])
        for key, value in ddp[name].items():
            torch.testing.assert_close(fsdp[name][key], value, rtol=1e-5, atol=1e-6)


def test_an_exception_tears_the_process_group_down(two_rank_runs):
    out = two_rank_runs / "failing"
    for rank in (0, 1):
        assert json.loads((out / f"after-failure-rank{rank}.json").read_text()) == {"initialized": False}
    assert not (out / "final.pt").exists()
