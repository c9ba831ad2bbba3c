"""The `neodragon` command-line app.

Every module in `neodragon_cli.commands` that defines `register(app)` adds its command(s) here, so a
command appears in `--help` exactly when its module exists. Command modules import only typer and
light `neodragon_cli` modules at the top; torch, rich tables and the pipelines are imported inside
the handlers, so `--help` stays fast (benchmarks/cli_startup.py).

Errors of the `NeodragonError` family print one line and exit with their code (2 usage, 1 runtime);
typer's own usage errors (unknown option, bad value) print the usage line and exit 2; anything else
prints one line too, unless `--debug` asks for the traceback.
"""

from __future__ import annotations

import sys

from neodragon_cli import __version__

_state = {"debug": False}


def main() -> None:
    """The `neodragon` console script. `neodragon --version` answers before typer or any command
    module is imported; everything else goes through the app."""
    args = sys.argv[1:]
    if args == ["--version"]:
        print(f"neodragon {__version__}")
        return
    if "--debug" in args:
        _state["debug"] = True
    _build_app()()


def __getattr__(name: str):
    """`app`, the typer app, is built on first use (`from neodragon_cli.app import app` works)."""
    if name == "app":
        return _build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _print_error(text: str) -> None:
    from neodragon_cli.console import console

    console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)


def _build_app():
    """The typer app with every command module's commands registered (built once)."""
    if "app" in globals():
        return globals()["app"]
    import typer
    from typer.core import TyperGroup

    from neodragon_cli.errors import NeodragonError
    from neodragon_cli.registry import import_submodules

    class Group(TyperGroup):
        """Turns our exceptions into one-line messages and exit codes (also under CliRunner)."""

        def invoke(self, ctx: typer.Context):
            try:
                return super().invoke(ctx)
            except NeodragonError as exc:
                if _state["debug"]:
                    raise
                _print_error(exc.one_line())
                ctx.exit(exc.exit_code)
            except (typer.TyperException, typer.Exit, typer.Abort):
                raise  # typer's own: usage errors print the usage line and exit 2
            except KeyboardInterrupt:
                _print_error("interrupted")
                ctx.exit(130)
            except Exception as exc:  # an unexpected failure: one line unless --debug
                if _state["debug"]:
                    raise
                _print_error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
                ctx.exit(1)

    app = typer.Typer(
        name="neodragon",
        cls=Group,
        help="Make Pyramid-Flow-class text-to-video transformers mobile-ready (the Neodragon method) and generate videos.",
        no_args_is_help=True,
        rich_markup_mode=None,  # plain help: typer's rich help imports rich's markdown stack (~1/3 of --help's start-up)
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def print_version(value: bool) -> None:
        if value:
            typer.echo(f"neodragon {__version__}")
            raise typer.Exit()

    @app.callback()
    def options(
        version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True, help="Print the version and exit."),
        debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    ) -> None:
        _state["debug"] = debug

    for module in import_submodules("neodragon_cli.commands"):
        if callable(getattr(module, "register", None)):
            module.register(app)
    globals()["app"] = app
    return app
