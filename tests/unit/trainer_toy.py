"""A tiny regression task for the trainer tests, and a script that trains it in a subprocess.

    python tests/unit/trainer_toy.py '[{"out": "run", "config": {"max_steps": 6}, "toy": {}}]'
    torchrun --standalone --nproc_per_node 2 tests/unit/trainer_toy.py '[...]'

Each run in the JSON list trains `ToyMLP` with `Trainer` and (rank 0) saves the final weights to
`<out>/final.pt`. `sleep` slows every step, so a test can signal the process mid-run.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn

from neodragon_cli.pipelines.train import distributed
from neodragon_cli.pipelines.train.trainer import IndexedBatches, Trainer, TrainerConfig

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


def main(runs: list[dict]) -> None:
    torch.set_num_threads(1)
    for run in runs:
        trainer = make_trainer(run["out"], run["config"], resume=run.get("resume", False), **run.get("toy", {}))
        pause = run.get("sleep", 0.0)
        trainer.fit(on_step_end=(lambda t, s: time.sleep(pause)) if pause else None)
        state = trainer.model_state_dict()
        if trainer.env.is_main:
            torch.save(state, f"{run['out']}/final.pt")
        del trainer, state
    distributed.teardown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
