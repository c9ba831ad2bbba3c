"""The shared trainer: exact resume (in process and after a real SIGTERM), gradient accumulation,
learning-rate schedules against torch's own schedulers, metrics, and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from neodragon_cli.errors import ArtifactError, UsageError
from neodragon_cli.pipelines.train import distributed
from neodragon_cli.pipelines.train.trainer import (
    IndexedBatches, Trainer, TrainerConfig, latest_checkpoint, lr_at, resolve_precision,
)
from trainer_toy import assert_tree_equal, read_metrics, ToyMLP, make_trainer, sample

TOY_SCRIPT = Path(__file__).with_name("trainer_toy.py")

# Every stateful feature on: warmup + cosine, accumulation, clipping, EMA, dropout, loss noise, epochs.
FULL = dict(seed=3, max_steps=10, batch_size=8, grad_accum=2, lr=3e-2, schedule="cosine", warmup_steps=2,
            weight_decay=0.01, grad_clip=0.5, ema=0.9, checkpoint_every=3, log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(out: Path) -> dict:
    return torch.load(latest_checkpoint(out), weights_only=True)


def _assert_same_run(reference: Path, resumed: Path):
    ref, res = _checkpoint(reference), _checkpoint(resumed)
    assert ref["step"] == res["step"] == FULL["max_steps"]
    for part in ("models", "optimizers", "ema"):
        assert_tree_equal(ref[part], res[part], part)
    ref_lines, res_lines = read_metrics(reference), read_metrics(resumed)
    assert [m["step"] for m in res_lines] == list(range(1, FULL["max_steps"] + 1))
    for a, b in zip(ref_lines, res_lines):
        assert (a["loss"], a["lr"], a["grad_norm"], a["target_abs"]) == (b["loss"], b["lr"], b["grad_norm"], b["target_abs"])


def test_resume_after_stop_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    result = make_trainer(reference, FULL).fit()
    assert (result.step, result.stopped) == (10, False)

    def stop_at_4(trainer, step):
        if step == 4:
            trainer.request_stop()

    resumed = tmp_path / "resumed"
    result = make_trainer(resumed, FULL).fit(on_step_end=stop_at_4)
    assert (result.step, result.stopped) == (4, True)
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-00000004.pt"]  # step 3's was replaced
    # A different initialisation: only the checkpoint can make the weights agree.
    trainer = make_trainer(resumed, FULL, model_seed=99, resume=True)
    assert trainer.step == 4
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4]
    assert trainer.fit().step == 10
    _assert_same_run(reference, resumed)


def test_keep_every_keeps_those_checkpoints_and_resume_takes_the_latest(tmp_path):
    config = {**FULL, "checkpoint_every": 2, "keep_every": 4}
    make_trainer(tmp_path, {**config, "max_steps": 9}).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000008.pt", "step-00000009.pt"]
    assert make_trainer(tmp_path, config, resume=True).step == 9
    assert any("keep_every" in p for p in TrainerConfig(keep_every=-1).validate())


def test_resume_after_real_sigterm_is_bit_identical(tmp_path):
    """A subprocess is sent SIGTERM at an unpredictable step; it checkpoints, exits 0, and the
    resumed run still ends bit-identical to an uninterrupted one."""
    reference = tmp_path / "reference"
    make_trainer(reference, FULL).fit()

    resumed = tmp_path / "resumed"
    config = {**FULL, "checkpoint_every": 0}  # only the stop writes a checkpoint
    spec = [{"out": str(resumed), "config": config, "sleep": 0.15}]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(TOY_SCRIPT), json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = resumed / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "trainer made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    stopped_at = _checkpoint(resumed)["step"]
    assert 2 <= stopped_at < FULL["max_steps"]
    assert [m["step"] for m in read_metrics(resumed)] == list(range(1, stopped_at + 1))

    trainer = make_trainer(resumed, FULL, model_seed=99, resume=True)
    assert trainer.step == stopped_at
    trainer.fit()
    _assert_same_run(reference, resumed)


def test_grad_accumulation_matches_full_batch(tmp_path):
    base = dict(max_steps=5, batch_size=8, lr=1e-2, grad_clip=None, log_every=1)
    full = make_trainer(tmp_path / "full", {**base, "grad_accum": 1}, noise=False, dropout=0.0)
    split = make_trainer(tmp_path / "split", {**base, "grad_accum": 2}, noise=False, dropout=0.0)
    start = {k: v.clone() for k, v in full.model.state_dict().items()}
    full.fit()
    split.fit()
    for name, value in full.model.state_dict().items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        torch.testing.assert_close(split.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_matches_torch_schedulers(tmp_path, schedule):
    """The trainer's per-update lr equals torch's LinearLR warmup followed by torch's own
    constant / CosineAnnealingLR / LinearLR decay."""
    warmup, steps, lr = 3, 12, 0.5
    min_lr = 0.05 if schedule == "cosine" else 0.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    after = {
        "constant": lambda: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=min_lr),
        "linear": lambda: torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=steps - warmup),
    }[schedule]()
    ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, after], milestones=[warmup])
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    config = dict(max_steps=steps, batch_size=2, lr=lr, min_lr=min_lr, schedule=schedule, warmup_steps=warmup, log_every=1)
    assert [lr_at(s, TrainerConfig(**config)) for s in range(steps)] == pytest.approx(expected, rel=1e-12)
    used = []
    trainer = make_trainer(tmp_path, config)
    trainer.fit(on_step_end=lambda t, s: used.append(t.optimizer.param_groups[0]["lr"]))
    assert used == pytest.approx(expected, rel=1e-12)
    assert [m["lr"] for m in read_metrics(tmp_path)] == pytest.approx(expected, rel=1e-12)


def test_metrics_lines_and_bf16(tmp_path):
    trainer = make_trainer(tmp_path, dict(max_steps=5, batch_size=4, log_every=2, precision="bf16", checkpoint_every=0))
    result = trainer.fit()
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [2, 4, 5]  # every log_every, and the last update
    for line in lines:
        assert {"step", "loss", "lr", "it_s", "elapsed_s", "grad_norm", "target_abs"} <= set(line)
        assert line["loss"] > 0 and line["it_s"] > 0
    assert result.metrics == lines[-1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005.pt"]


def test_indexed_batches_walk_seeded_epochs():
    data = IndexedBatches(lambda i: torch.tensor(i), length=5, seed=1)
    first, second = data(range(0, 5)).tolist(), data(range(5, 10)).tolist()
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert IndexedBatches(lambda i: torch.tensor(i), length=5, seed=1)(range(3, 8)).tolist() == first[3:] + second[:3]
    assert IndexedBatches(lambda i: torch.tensor(i))(range(7, 10)).tolist() == [7, 8, 9]


def test_refusals(tmp_path):
    config = dict(max_steps=2, batch_size=4)
    make_trainer(tmp_path, config).fit()
    with pytest.raises(ArtifactError, match="already holds training checkpoints"):
        make_trainer(tmp_path, config)
    with pytest.raises(UsageError, match="seed=0, now seed=5"):
        make_trainer(tmp_path, {**config, "seed": 5}, resume=True)
    with pytest.raises(UsageError, match="must be a multiple of grad_accum"):
        make_trainer(tmp_path / "other", {"batch_size": 6, "grad_accum": 4})
    with pytest.raises(UsageError, match="fsdp needs several processes"):
        make_trainer(tmp_path / "other", {"fsdp": True})
    problems = TrainerConfig(max_steps=5, warmup_steps=5, ema=1.5, lr=0.0, min_lr=0.0, grad_clip=0.0).validate()
    assert any("warmup_steps" in p for p in problems) and any("ema" in p for p in problems)
    assert any("lr must be positive" in p for p in problems) and any("grad_clip" in p for p in problems)
    assert TrainerConfig().validate() == []


def test_loss_network_keeps_its_mode_and_weights(tmp_path):
    """A loss_fn that is itself a module (a frozen perceptual net) is not trained or put in train mode."""

    class Judge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

        def forward(self, model, batch, generator):
            return ((model(batch["x"]) - batch["y"]) * self.scale).pow(2).mean(), {}

    judge = Judge().eval()
    trainer = Trainer(ToyMLP(), judge, IndexedBatches(sample), TrainerConfig(max_steps=2, batch_size=2, lr=0.1),
                      tmp_path, progress=False)
    trainer.fit()
    assert trainer.model.training and not judge.training
    assert torch.equal(judge.scale.detach(), torch.ones(3))
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(trainer.model.parameters()))


def test_process_group_leaves_a_running_group_to_its_owner(tmp_path):
    """`process_group` tears down only a group it started (the torchrun test checks that it does)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="boom"), distributed.process_group():
            raise RuntimeError("boom")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_auto_precision_follows_the_device_and_survives_a_resume(tmp_path, monkeypatch):
    from neodragon_cli.pipelines.train import trainer as trainer_module

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu) == "bf16"
    first = make_trainer(tmp_path, dict(max_steps=1, batch_size=4, precision="auto", checkpoint_every=1))
    assert first.precision == "bf16"
    first.fit()
    # resumed where bf16 is emulated: the run keeps the precision it started with
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu) == "fp32"
    resumed = make_trainer(tmp_path, dict(max_steps=2, batch_size=4, precision="auto", checkpoint_every=1), resume=True)
    assert resumed.precision == "bf16"
