"""`neodragon train RECIPE`: train the Shapes-world teacher stages (train-vae, train-t2v recipes)."""

from __future__ import annotations

from pathlib import Path

import typer

from neodragon_cli import recipes as R
from neodragon_cli.artifacts import check_output_dir
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.train import shapes_teacher

_RUNNERS = {"train-vae": shapes_teacher.train_vae, "train-t2v": shapes_teacher.train_t2v}


def train(
    recipe: str = typer.Argument(..., help="A train-vae or train-t2v recipe (shipped name or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.work/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Train a Shapes-teacher stage. Checkpoints go to OUT.work/ (Ctrl-C saves one; --resume continues
    exactly); the finished artifact (weights, recipe.yaml, metrics.jsonl, state.json) goes to OUT."""
    obj = R.load(recipe, overrides or [])
    command = R.command_of(obj)
    if command not in _RUNNERS:
        raise UsageError(f"recipe is for '{command}', not a training stage", hint=f"use a {' or '.join(_RUNNERS)} recipe")
    check_output_dir(out, overwrite)
    _RUNNERS[command](obj, out, recipe_yaml=R.dump(obj), resume=resume, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
