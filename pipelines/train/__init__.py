"""Training: the shared loop (`trainer.py`), process groups (`distributed.py`), and one module per
training command holding its recipe schema and its run function side by side, registered together:

    @training_command("train-vae", TrainVAERecipe)
    def train_vae(recipe: TrainVAERecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> TrainingOutcome:
        ...

`training_commands()` imports this package's modules and returns what they registered.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from neodragon_cli.recipes import recipe_schema
from neodragon_cli.registry import import_submodules

if TYPE_CHECKING:
    from neodragon_cli.artifacts import ArtifactWriter


@dataclass(frozen=True)
class TrainingOutcome:
    """How a training command ended: at `step`, with the artifact written to `artifact`, or stopped
    before it (`artifact` None), its checkpoints in `work` for a resume."""

    step: int
    work: Path
    artifact: Path | None

    @property
    def stopped(self) -> bool:
        return self.artifact is None


RunFn = Callable[..., TrainingOutcome]


@dataclass(frozen=True)
class TrainingCommand:
    """A registered training command: its recipe schema and its run function."""

    name: str
    schema: type
    run: RunFn


_COMMANDS: dict[str, TrainingCommand] = {}


def training_command(name: str, schema: type) -> Callable[[RunFn], RunFn]:
    """Register `run(recipe, out, *, recipe_yaml, resume, overwrite) -> TrainingOutcome` as the training
    command `name`, and `schema` as its recipe schema. Under torchrun the registered run starts the
    process group and tears it down on every exit path (`distributed.process_group`)."""
    recipe_schema(name)(schema)

    def register(run: RunFn) -> RunFn:
        @functools.wraps(run)
        def in_process_group(*args, **kwargs) -> TrainingOutcome:
            from neodragon_cli.pipelines.train import distributed

            with distributed.process_group():
                return run(*args, **kwargs)

        _COMMANDS[name] = TrainingCommand(name, schema, in_process_group)
        return in_process_group

    return register


def training_commands() -> dict[str, TrainingCommand]:
    """Every training command, by name (importing the modules that register them: the Shapes stages here,
    the optimisation commands in `pipelines/distill`)."""
    import_submodules(__name__)
    import_submodules("neodragon_cli.pipelines.distill")
    return dict(sorted(_COMMANDS.items()))


def copy_metrics(work: Path, art: ArtifactWriter) -> None:
    """Log the trainer's `metrics.jsonl` in `work` (when there is one) into the artifact being written."""
    metrics = work / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            art.log_metrics(json.loads(line))
