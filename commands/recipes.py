"""`neodragon recipes list|show|validate`."""

from __future__ import annotations

from pathlib import Path

import typer

recipes_app = typer.Typer(help="List, show and validate YAML recipes.", no_args_is_help=True)


def _description(path: Path) -> tuple[str, str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return "?", "(not valid YAML)"
    return str(data.get("command", "")), str(data.get("description", ""))


@recipes_app.command("list")
def list_recipes() -> None:
    """List the shipped recipes (name, command, description)."""
    from rich.table import Table

    from neodragon_cli import recipes as R
    from neodragon_cli.console import console

    table = Table("recipe", "command", "description", title="shipped recipes")
    for name, path in R.shipped_recipes().items():
        table.add_row(name, *_description(path))
    console.print(table)


@recipes_app.command("show")
def show(
    recipe: str = typer.Argument(..., help="Shipped recipe name or YAML path."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides."),
    schema: bool = typer.Option(False, "--schema", help="Show the schema (keys, types, defaults, docs) instead."),
) -> None:
    """Print a recipe fully resolved (inheritance, defaults and overrides applied)."""
    from rich.table import Table

    from neodragon_cli import recipes as R
    from neodragon_cli.console import console

    obj = R.load(recipe, overrides or [])
    if schema:
        table = Table("key", "type", "default", "doc", title=f"schema of '{R.command_of(obj)}' recipes")
        for row in R.describe(type(obj)):
            table.add_row(*row)
        console.print(table)
        return
    typer.echo(R.dump(obj), nl=False)


@recipes_app.command("validate")
def validate(
    paths: list[str] = typer.Argument(..., help="Recipe files or shipped names."),
    overrides: list[str] = typer.Option([], "--set", help="key.sub=value override applied to each recipe."),
) -> None:
    """Validate recipes: every problem in every file is reported; exit 2 if any."""
    from neodragon_cli import recipes as R
    from neodragon_cli.console import console
    from neodragon_cli.errors import RecipeError

    problems = []
    for path in paths:
        found = R.validate(path, overrides)
        if found:
            problems.extend(found)
        else:
            console.print(f"[green]ok[/] {path}", highlight=False)
    if problems:
        keys = any("unknown key" in p for p in problems)
        raise RecipeError(problems, hint="see `neodragon recipes show RECIPE --schema` for the allowed keys" if keys else None)


def register(app: typer.Typer) -> None:
    app.add_typer(recipes_app, name="recipes")
