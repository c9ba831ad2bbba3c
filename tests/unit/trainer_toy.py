"""Tiny tasks for the trainer tests, and a script that trains them in a subprocess.

    python tests/unit/trainer_toy.py '[{"out": "run", "config": {"max_steps": 6}, "toy": {}}]'
    torchrun --standalone --nproc_per_node 2 tests/unit/trainer_toy.py '[...]'

A regression of `ToyMLP` with `Trainer`, or (`"two_models": {...optimizers}`) a generator trained
against a critic and a frozen teacher with `MultiModelTrainer`. Each run in the JSON list trains and
(rank 0) saves the final weights to `<out>/final.pt` (`{name: state}` for two models). `sleep` slows
every step, so a test can signal the process mid-run; `fail_at` raises `ToyFailure` on every rank
after that step, and the script then records in `<out>/after-failure-rank<R>.json` whether a process
group is still running (it must be the last run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from neodragon_cli.pipelines.train import distributed
from neodragon_cli.pipelines.train.trainer import (
    IndexedBatches,
    LoopConfig,
    MultiModelTrainer,
    OptimizerConfig,
    Phase,
    Trainer,
    TrainerConfig,
)

IN, OUT, DATASET = 6, 3, 24
_TARGET = torch.Generator().manual_seed(1234)
TARGET = torch.randn(IN, OUT, generator=_TARGET)


class ToyMLP(nn.Module):
    """Two linear blocks in a ModuleList (so FSDP shards them as units), GELU and dropout between."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(IN, hidden), nn.Linear(hidden, OUT)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.dropout(nn.functional.gelu(self.blocks[0](x))))


def assert_tree_equal(a, b, path="state"):
    """Bit-identical nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path} keys differ"
        for key in a:
            assert_tree_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path} lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def sample(index: int) -> dict[str, torch.Tensor]:
    """Sample `index` of a fixed dataset: x ~ N(0, 1), y = x @ TARGET."""
    x = torch.randn(IN, generator=torch.Generator().manual_seed(index))
    return {"x": x, "y": x @ TARGET}


def make_loss(noise: bool):
    """MSE of the model on inputs perturbed with noise drawn from the trainer's generator."""

    def loss_fn(model: nn.Module, batch: dict, generator: torch.Generator):
        x = batch["x"]
        if noise:
            x = x + 0.1 * torch.randn(x.shape, generator=generator, device=x.device)
        mse = (model(x) - batch["y"]).pow(2).mean()
        return mse, {"target_abs": batch["y"].abs().mean()}

    return loss_fn


def make_trainer(out, config: dict, *, noise: bool = True, dropout: float = 0.1, model_seed: int = 0,
                 resume: bool = False) -> Trainer:
    torch.manual_seed(model_seed)
    model = ToyMLP(dropout=dropout)
    data = IndexedBatches(sample, length=DATASET, seed=config.get("seed", 0))
    return Trainer(model, make_loss(noise), data, TrainerConfig(**config), out, resume=resume, progress=False)


class ToyCritic(nn.Module):
    """Scores OUT-dim vectors. `aux` is read only by the generator's loss, so it gets no gradient in
    the critic's own phase (the case DDP must be told about)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(OUT, hidden), nn.Linear(hidden, 1)])
        self.aux = nn.Linear(OUT, 1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](nn.functional.gelu(self.blocks[0](y)))


def make_teacher() -> nn.Module:
    """A fixed network with batch norm: in train mode its running statistics would move."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(IN, OUT), nn.BatchNorm1d(OUT))


def make_phases(noise: bool, ratio: int = 2, calls: dict | None = None) -> list[Phase]:
    """`ratio` critic updates (least-squares GAN) per generator update (regression towards the
    data nudged by the teacher, plus the critic's opinion). `calls` counts each loss's calls."""

    def jitter(y, generator):
        return y + 0.1 * torch.randn(y.shape, generator=generator, device=y.device) if noise else y

    def critic_loss(models, batch, generator):
        if calls is not None:
            calls["critic"] = calls.get("critic", 0) + 1
        with torch.no_grad():
            fake = models["generator"](batch["x"])
        real_score, fake_score = models["critic"](jitter(batch["y"], generator)), models["critic"](fake)
        loss = (real_score - 1).pow(2).mean() + (fake_score + 1).pow(2).mean()
        return loss, {"real_score": real_score.mean()}

    def generator_loss(models, batch, generator):
        if calls is not None:
            calls["generator"] = calls.get("generator", 0) + 1
        out = models["generator"](jitter(batch["x"], generator))
        target = batch["y"] + 0.1 * models["teacher"](batch["x"])
        adversarial = (models["critic"](out) - 1).pow(2).mean() + 0.01 * models["critic"].aux(out).pow(2).mean()
        return (out - target).pow(2).mean() + 0.1 * adversarial, {"adversarial": adversarial}

    return [Phase("critic", critic_loss, ("critic",), repeats=ratio), Phase("generator", generator_loss, ("generator",))]


def make_two_model_trainer(out, config: dict, optimizers: dict[str, dict], *, noise: bool = True,
                           dropout: float = 0.1, model_seed: int = 0, ratio: int = 2, calls: dict | None = None,
                           resume: bool = False) -> MultiModelTrainer:
    torch.manual_seed(model_seed)
    models = {"generator": ToyMLP(dropout=dropout), "critic": ToyCritic(), "teacher": make_teacher()}
    data = IndexedBatches(sample, length=DATASET, seed=config.get("seed", 0))
    return MultiModelTrainer(models, {name: OptimizerConfig(**o) for name, o in optimizers.items()},
                             make_phases(noise, ratio, calls), data, LoopConfig(**config), out, resume=resume,
                             progress=False)


class ToyFailure(Exception):
    """What `fail_at` raises."""


def _train(run: dict) -> None:
    if "two_models" in run:
        trainer = make_two_model_trainer(run["out"], run["config"], run["two_models"], **run.get("toy", {}))
    else:
        trainer = make_trainer(run["out"], run["config"], resume=run.get("resume", False), **run.get("toy", {}))
    pause, fail_at = run.get("sleep", 0.0), run.get("fail_at")

    def on_step_end(_, step):
        time.sleep(pause)
        if step == fail_at:
            raise ToyFailure(run["out"])

    trainer.fit(on_step_end=on_step_end)
    trained = list(trainer.optimizers)
    states = {name: trainer.model_state_dict(name) for name in trained}
    if trainer.env.is_main:
        torch.save(states if len(trained) > 1 else states[trained[0]], f"{run['out']}/final.pt")


def main(runs: list[dict]) -> None:
    torch.set_num_threads(1)
    try:
        with distributed.process_group():
            for run in runs:
                _train(run)
    except ToyFailure as failure:
        after = Path(str(failure), f"after-failure-rank{os.environ.get('RANK', '0')}.json")
        after.write_text(json.dumps({"initialized": dist.is_initialized()}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
