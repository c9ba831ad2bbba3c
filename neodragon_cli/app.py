"""The `neodragon` command-line app.

Every module in `neodragon_cli.commands` that defines `register(app)` adds its command(s) here, so a
command appears in `--help` exactly when its module exists. Errors of the `NeodragonError` family
print one line and exit with their code (2 usage, 1 runtime); anything else prints one line too,
unless `--debug` asks for the traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperGroup

from neodragon_cli import __version__
from neodragon_cli.console import console
from neodragon_cli.errors import NeodragonError
from neodragon_cli.registry import import_submodules

_state = {"debug": False}


class _Group(TyperGroup):
    """Turns our exceptions into one-line messages and exit codes (also under CliRunner)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NeodragonError as exc:
            if _state["debug"]:
                raise
            console.print(f"[bold red]error:[/] {exc.one_line()}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)
        except (typer.Exit, click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            ctx.exit(130)
        except Exception as exc:  # an unexpected failure: one line unless --debug
            if _state["debug"]:
                raise
            console.print(
                f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            ctx.exit(1)


app = typer.Typer(
    name="neodragon",
    cls=_Group,
    help="Make Pyramid-Flow-class text-to-video transformers mobile-ready (the Neodragon method) and generate videos.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"neodragon {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


_loaded = False


def load_command_modules() -> None:
    """Import every command module once, registering its commands (and recipe schemas)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in import_submodules("neodragon_cli.commands"):
        register = getattr(module, "register", None)
        if callable(register):
            register(app)


load_command_modules()


def main() -> None:
    if "--debug" in sys.argv[1:]:
        _state["debug"] = True
    app()
