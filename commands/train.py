"""`neodragon train RECIPE`: run a training command (train-vae, train-t2v: the Shapes-teacher stages).

Each training command is a module of `pipelines/train/` holding its recipe schema and run function,
registered together; this module looks the recipe's command up there. Torch and the pipelines are
imported inside the handler, so `neodragon --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    recipe: str = typer.Argument(..., help="A train-vae or train-t2v recipe (shipped name or YAML path)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.work/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT when done."),
) -> None:
    """Train a Shapes-teacher stage. Checkpoints go to OUT.work/ (Ctrl-C saves one; --resume continues
    exactly); the finished artifact (weights, recipe.yaml, metrics.jsonl, state.json) goes to OUT.
    Under `torchrun --nproc_per_node N` the ranks share each batch; rank 0 writes the files."""
    from neodragon_cli import recipes as R
    from neodragon_cli.artifacts import check_output_dir
    from neodragon_cli.console import console
    from neodragon_cli.errors import UsageError
    from neodragon_cli.pipelines.train import training_commands

    commands = training_commands()  # registers their recipe schemas before the recipe is read
    obj = R.load(recipe, overrides or [])
    command = R.command_of(obj)
    if command not in commands:
        raise UsageError(f"recipe is for '{command}', not a training stage", hint=f"use a {' or '.join(commands)} recipe")
    check_output_dir(out, overwrite)
    outcome = commands[command].run(obj, out, recipe_yaml=R.dump(obj), resume=resume, overwrite=overwrite)
    if outcome.stopped:
        console.print(f"stopped at step {outcome.step}; continue with --resume (checkpoints in {outcome.work})")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
