"""`neodragon components list [KIND]` and `components inspect PATH`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.paths import check_output_file

components_app = typer.Typer(help="The component registry: what can be loaded, and what a checkpoint holds.", no_args_is_help=True)

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".tar", ".pt", ".bin")


@components_app.command("list")
def list_components(kind: str = typer.Argument(None, help="Only this kind (e.g. mmdit, vae, text).")) -> None:
    """List registered components by kind and name."""
    from rich.table import Table

    from neodragon_cli import registry
    from neodragon_cli.console import console

    table = Table("component", "description", title="registered components")
    for c in registry.components(kind):
        table.add_row(c.key, c.description)
    console.print(table)


def _tensor_summary(files: list[Path]) -> tuple[int, Counter]:
    """Parameter count and dtype histogram read from weight files (safetensors headers only)."""
    total, dtypes = 0, Counter()
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        sl = fh.get_slice(key)
                        n = 1
                        for s in sl.get_shape():
                            n *= s
                        total += n
                        dtypes[sl.get_dtype()] += n
            except Exception as exc:  # safetensors raises its own error type for a damaged header
                raise CheckpointError(f"{f} is not a valid checkpoint file ({exc})") from None
        else:
            from neodragon_cli.pipelines.models.checkpoint import read_state_dict

            state = read_state_dict(f)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            for t in state.values():
                if hasattr(t, "numel"):
                    total += t.numel()
                    dtypes[str(t.dtype).removeprefix("torch.")] += t.numel()
    return total, dtypes


@components_app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint folder or file."),
    load: bool = typer.Option(True, "--load/--no-load", help="Also build the model and check every key and shape."),
    json_out: Path = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
) -> None:
    """What a checkpoint holds: component kind, parameter count, dtypes, missing/unexpected keys."""
    from rich.table import Table

    from neodragon_cli import registry
    from neodragon_cli.atomic import write_text
    from neodragon_cli.console import console

    if not path.exists():
        raise UsageError(f"{path} does not exist", hint="give a checkpoint folder or file")
    if json_out is not None and str(json_out) != "-":
        check_output_file(json_out)
    found = registry.detect(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES)
    params, dtypes = _tensor_summary(files)
    report = {
        "path": str(path),
        "component": found[0].key if found else None,
        "parameters": params,
        "dtypes": dict(dtypes),
        "weight_files": [str(f.relative_to(path)) if path.is_dir() else f.name for f in files],
    }
    if found and load:
        try:
            module = found[0].load(path)
            report["load"] = "ok"
            report["loaded_parameters"] = sum(p.numel() for p in module.parameters())
        except CheckpointError as exc:
            report["load"] = exc.message
    if json_out is not None:
        text = json.dumps(report, indent=2)
        if str(json_out) == "-":
            typer.echo(text)
        else:
            write_text(json_out, text + "\n")
    table = Table(show_header=False, title=str(path))
    table.add_row("component", report["component"] or "[red]not recognised[/]")
    table.add_row("parameters", f"{params:,}")
    table.add_row("dtypes", ", ".join(f"{k}: {v:,}" for k, v in dtypes.items()) or "-")
    if "load" in report:
        table.add_row("keys", "[green]all present, shapes match[/]" if report["load"] == "ok" else f"[red]{report['load']}[/]")
    console.print(table)
    if not found:
        known = ", ".join(c.key for c in registry.components())
        raise CheckpointError(f"{path} is not a recognised checkpoint", hint=f"known components: {known}")
    if report.get("load", "ok") != "ok":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(components_app, name="components")
