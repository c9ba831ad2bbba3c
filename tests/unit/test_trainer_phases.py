"""The trainer with several models: a generator and a critic trained in phases (2 critic updates per
generator update) next to a frozen teacher. Exact resume, the update ratio, frozen models, per-model
learning rates and clipping, per-phase metrics, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.train.trainer import (
    CHECKPOINT_FORMAT,
    IndexedBatches,
    LoopConfig,
    MultiModelTrainer,
    OptimizerConfig,
    Phase,
    latest_checkpoint,
    lr_at,
)
from trainer_toy import assert_tree_equal, read_metrics, ToyCritic, ToyMLP, make_phases, make_teacher, make_two_model_trainer, sample

LOOP = dict(seed=5, max_steps=8, batch_size=8, grad_accum=2, checkpoint_every=3, log_every=1)
OPTIMIZERS = {
    "generator": dict(lr=2e-2, schedule="cosine", warmup_steps=2, weight_decay=0.01, grad_clip=0.5, ema=0.9),
    "critic": dict(lr=5e-2, schedule="linear", min_lr=1e-3, grad_clip=0.05, betas=(0.5, 0.9)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(out: Path) -> dict:
    return torch.load(latest_checkpoint(out), weights_only=True)


def test_two_model_run_stopped_and_resumed_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    assert make_two_model_trainer(reference, LOOP, OPTIMIZERS).fit().step == 8

    def stop_at_4(trainer, step):
        if step == 4:
            trainer.request_stop()

    resumed = tmp_path / "resumed"
    result = make_two_model_trainer(resumed, LOOP, OPTIMIZERS).fit(on_step_end=stop_at_4)
    assert (result.step, result.stopped) == (4, True)
    # Other initial weights: only the checkpoint can make the runs agree.
    trainer = make_two_model_trainer(resumed, LOOP, OPTIMIZERS, model_seed=99, resume=True)
    assert trainer.step == 4
    assert trainer.fit().step == 8

    ref, res = _checkpoint(reference), _checkpoint(resumed)
    assert ref["format"] == CHECKPOINT_FORMAT and ref["step"] == 8
    assert set(ref["models"]) == set(ref["optimizers"]) == {"generator", "critic"}  # not the frozen teacher
    assert set(ref["ema"]) == {"generator"}
    for part in ("models", "optimizers", "ema", "phases"):
        assert_tree_equal(ref[part], res[part], part)
    ref_lines, res_lines = read_metrics(reference), read_metrics(resumed)
    assert [m["step"] for m in res_lines] == list(range(1, 9))
    for a, b in zip(ref_lines, res_lines):
        assert {k: v for k, v in a.items() if k not in ("it_s", "elapsed_s")} == \
               {k: v for k, v in b.items() if k not in ("it_s", "elapsed_s")}


def test_update_ratio_and_frozen_teacher(tmp_path):
    calls: dict[str, int] = {}
    trainer = make_two_model_trainer(tmp_path, {**LOOP, "max_steps": 3}, OPTIMIZERS, ratio=3, calls=calls)
    teacher = trainer.models["teacher"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    critic_start = {k: v.clone() for k, v in trainer.models["critic"].state_dict().items()}
    trainer.fit()

    assert calls == {"critic": 3 * 3 * 2, "generator": 3 * 2}  # updates x micro-batches
    for name, updates in (("critic", 9), ("generator", 3)):
        states = trainer.optimizers[name].state.values()
        assert states and all(int(s["step"]) == updates for s in states)
    assert set(trainer.optimizers) == {"generator", "critic"}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert_tree_equal(before, teacher.state_dict(), "teacher")  # weights and batch-norm statistics
    # The critic's aux head gets gradients only where the critic is idle: it never moves, and Adam
    # keeps no state for it; the rest of the critic trained.
    critic = trainer.models["critic"]
    assert torch.equal(critic.aux.weight, critic_start["aux.weight"])
    assert critic.aux.weight not in trainer.optimizers["critic"].state
    assert not torch.equal(critic.blocks[0].weight, critic_start["blocks.0.weight"])
    assert all(p.requires_grad for p in critic.parameters()) and critic.training


def test_per_model_learning_rates_and_clipping(tmp_path):
    optimizers = {"generator": {**OPTIMIZERS["generator"], "grad_clip": None}, "critic": OPTIMIZERS["critic"]}
    stepped_norms: dict[str, list[float]] = {"generator": [], "critic": []}
    lrs: dict[str, list[float]] = {"generator": [], "critic": []}
    trainer = make_two_model_trainer(tmp_path, LOOP, optimizers)
    for name, optimizer in trainer.optimizers.items():
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def record(opt, args, kwargs, name=name, params=params):
            stepped_norms[name].append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
            lrs[name].append(opt.param_groups[0]["lr"])

        optimizer.register_step_pre_hook(record)
    trainer.fit()

    steps = LOOP["max_steps"]
    expected = {name: [lr_at(s, OptimizerConfig(**o), steps) for s in range(steps)] for name, o in optimizers.items()}
    assert lrs["generator"] == pytest.approx(expected["generator"], rel=1e-12)
    assert lrs["critic"] == pytest.approx([lr for lr in expected["critic"] for _ in range(2)], rel=1e-12)
    assert expected["generator"][:2] == pytest.approx([1e-2, 2e-2]) and expected["critic"][-1] > 1e-3

    lines = read_metrics(tmp_path)
    assert [m["lr/critic"] for m in lines] == pytest.approx(expected["critic"], rel=1e-12)
    assert [m["lr/generator"] for m in lines] == pytest.approx(expected["generator"], rel=1e-12)
    clip = optimizers["critic"]["grad_clip"]
    assert max(stepped_norms["critic"]) <= clip * (1 + 1e-5)  # clipped before every critic update
    assert max(m["critic/grad_norm"] for m in lines) > clip  # the norms before clipping were larger
    assert max(stepped_norms["generator"]) > clip  # the generator is not clipped ...
    assert not any("generator/grad_norm" in m for m in lines)  # ... nor its norm logged
    for line in lines:
        assert {"critic/loss", "critic/real_score", "generator/loss", "generator/adversarial"} <= set(line)
        assert "loss" not in line and "lr" not in line


def test_refusals(tmp_path):
    models = {"generator": ToyMLP(), "critic": ToyCritic(), "teacher": make_teacher()}
    data = IndexedBatches(sample)
    phases = make_phases(noise=False)
    loop = LoopConfig(max_steps=2, batch_size=2)

    def build(optimizers, phases=phases, out=tmp_path / "x", **kwargs):
        return MultiModelTrainer(models, optimizers, phases, data, loop, out, progress=False, **kwargs)

    with pytest.raises(UsageError, match="'generator', which has no optimizer"):
        build({"critic": OptimizerConfig()})
    with pytest.raises(UsageError, match="'teacher' has an optimizer but no phase updates it"):
        build({"critic": OptimizerConfig(), "generator": OptimizerConfig(), "teacher": OptimizerConfig()})
    with pytest.raises(UsageError, match="unknown model 'critc'"):
        build({"critc": OptimizerConfig(), "critic": OptimizerConfig(), "generator": OptimizerConfig()})
    with pytest.raises(UsageError, match="critic: warmup_steps .2. must be below max_steps"):
        build({"critic": OptimizerConfig(warmup_steps=2), "generator": OptimizerConfig()})
    with pytest.raises(UsageError, match="phase names must be unique"):
        build({"critic": OptimizerConfig(), "generator": OptimizerConfig()}, phases + phases[:1])
    with pytest.raises(UsageError, match="several models train"):
        build({"critic": OptimizerConfig(), "generator": OptimizerConfig()}).model_state_dict()
    models["critic"].requires_grad_(False)
    with pytest.raises(UsageError, match="model 'critic' has no trainable parameters"):
        build({"critic": OptimizerConfig(), "generator": OptimizerConfig()})

    optimizers = {name: dict(lr=1e-2) for name in ("generator", "critic")}
    make_two_model_trainer(tmp_path / "run", {**LOOP, "max_steps": 2}, optimizers).fit()
    with pytest.raises(UsageError, match="same models and phases"):
        make_two_model_trainer(tmp_path / "run", LOOP, optimizers, ratio=3, resume=True)
    with pytest.raises(UsageError, match="EMA of 'critic'"):
        make_two_model_trainer(tmp_path / "run", LOOP, {**optimizers, "critic": dict(lr=1e-2, ema=0.9)}, resume=True)

    path = latest_checkpoint(tmp_path / "run")
    old = torch.load(path, weights_only=True)
    torch.save({**old, "format": 1}, path)
    with pytest.raises(CheckpointError, match="checkpoint format 1, this one reads 2"):
        make_two_model_trainer(tmp_path / "run", LOOP, optimizers, resume=True)


def test_one_phase_may_update_two_models(tmp_path):
    """A phase that updates both models (one loss, two optimizers) logs a grad norm per model."""

    def joint_loss(models, batch, generator):
        out = models["generator"](batch["x"])
        return (out - batch["y"]).pow(2).mean() + models["critic"](out).pow(2).mean(), {}

    models = {"generator": ToyMLP(), "critic": ToyCritic()}
    trainer = MultiModelTrainer(models, {"generator": OptimizerConfig(lr=1e-2), "critic": OptimizerConfig(grad_clip=None)},
                                [Phase("joint", joint_loss, ("generator", "critic"))], IndexedBatches(sample),
                                LoopConfig(max_steps=2, batch_size=2, log_every=1), tmp_path, progress=False)
    line = trainer.fit().metrics
    assert {"loss", "grad_norm.generator", "lr/generator", "lr/critic"} <= set(line)
    assert "grad_norm.critic" not in line
    assert all(int(s["step"]) == 2 for opt in trainer.optimizers.values() for s in opt.state.values())
