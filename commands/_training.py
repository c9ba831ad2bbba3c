"""What every training command does on the command line (train, distill-te, distill-decoder, prune run)."""

from __future__ import annotations

from pathlib import Path


def run_training_recipe(command: str | None, recipe: str, overrides: list[str] | None, out: Path, *,
                        resume: bool, overwrite: bool) -> None:
    """Load RECIPE with OVERRIDES (a `command` recipe when given, else any training recipe), refuse an OUT
    that cannot be written before any work, run the registered training command, and say how to
    continue a stopped run."""
    from neodragon_cli import recipes as R
    from neodragon_cli.artifacts import check_output_dir
    from neodragon_cli.console import console
    from neodragon_cli.errors import UsageError
    from neodragon_cli.pipelines.train import training_commands

    commands = training_commands()  # registers their recipe schemas before the recipe is read
    obj = R.load(recipe, overrides or [], command=command)
    name = R.command_of(obj)
    if name not in commands:
        raise UsageError(f"recipe is for '{name}', not a training command", hint=f"use a {', '.join(commands)} recipe")
    check_output_dir(out, overwrite)
    outcome = commands[name].run(obj, out, recipe_yaml=R.dump(obj), resume=resume, overwrite=overwrite)
    if outcome.stopped:
        console.print(f"stopped at step {outcome.step}; continue with --resume (checkpoints in {outcome.work})")
