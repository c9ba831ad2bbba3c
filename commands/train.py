"""`neodragon train RECIPE`: run a training command (train-vae, train-t2v: the Shapes-teacher stages).

Each training command is a module of `pipelines/train/` holding its recipe schema and run function,
registered together; this module looks the recipe's command up there. Torch and the pipelines are
imported inside the handler, so `neodragon --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    recipe: str = typer.Argument(..., help="A training recipe: train-vae, train-t2v, or an optimisation command's (shipped name or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.work/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Train a Shapes-teacher stage. Checkpoints go to OUT.work/ (Ctrl-C saves one; --resume continues
    exactly); the finished artifact (weights, recipe.yaml, metrics.jsonl, state.json) goes to OUT.
    Under `torchrun --nproc_per_node N` the ranks share each batch; rank 0 writes the files."""
    from neodragon_cli.commands._training import run_training_recipe

    run_training_recipe(None, recipe, overrides, out, resume=resume, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
